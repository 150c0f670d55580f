//! USDT discovery: the SystemTap v3 notes (`.note.stapsdt`) of an ELF file, each site's
//! address translated to the file offset the kernel attaches uprobes at, and each argument
//! spec decoded into a `vsrscope_common::ArgSpec`.
//!
//! Follows libbpf's reading of the format. Addresses are translated through the program
//! headers, never assumed equal to file offsets (with rust-lld they differ by a page). Notes
//! that describe no live site are reported as dead, not attached: those whose address lies in
//! no executable segment (left behind by a linker for code it discarded), and those whose
//! address holds no `nop` (a uprobe there would replace part of a real instruction).

use std::path::Path;

use object::elf::{FileHeader64, PF_X, PT_LOAD};
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader};
use object::{Endianness, ReadRef};
use thiserror::Error;
use vsrscope_common::{ARG_CONSTANT, ARG_REGISTER, ARG_REGISTER_DEREF, ARGS_MAX, ArgSpec};

const NOTE_TYPE_STAPSDT: u32 = 3;

#[derive(Debug, Error)]
pub enum UsdtError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not an ELF file")]
    NotElf { path: String },
    #[error("{path}: {reason}")]
    BadElf { path: String, reason: String },
    #[error("probe {provider}:{name} at {pc:#x}: argument {index} {spec:?}: {reason}")]
    BadArgument {
        provider: String,
        name: String,
        pc: u64,
        index: usize,
        spec: String,
        reason: String,
    },
}

/// One probe site, ready to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub provider: String,
    pub name: String,
    /// The note's virtual address (after `.stapsdt.base` adjustment).
    pub address: u64,
    /// Where the kernel attaches: the address's offset in the file.
    pub file_offset: u64,
    /// The semaphore's virtual address, 0 if the probe has none.
    pub semaphore_address: u64,
    /// The semaphore's file offset: the uprobe's `ref_ctr_offset`.
    pub semaphore_offset: u64,
    pub arguments_text: String,
    pub arguments: Vec<ArgSpec>,
}

/// Why a note describes no live site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// The address is in no executable segment: code the linker discarded.
    NotInCode,
    /// The bytes at the address are not a `nop`: not a probe site.
    NotANop,
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            DeadReason::NotInCode => "not in an executable segment",
            DeadReason::NotANop => "no nop at the address",
        })
    }
}

/// A note that is not attached, kept so that `vsrscope list` can show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadNote {
    pub provider: String,
    pub name: String,
    pub address: u64,
    pub reason: DeadReason,
}

/// Everything found in one file.
#[derive(Debug, Default)]
pub struct Discovery {
    pub sites: Vec<Site>,
    pub dead_notes: Vec<DeadNote>,
}

impl Discovery {
    pub fn probe_names(&self, provider: &str) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .sites
            .iter()
            .filter(|site| site.provider == provider)
            .map(|site| site.name.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    pub fn sites_of<'a>(
        &'a self,
        provider: &'a str,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Site> + 'a {
        self.sites
            .iter()
            .filter(move |site| site.provider == provider && site.name == name)
    }
}

pub fn discover_file(path: &Path) -> Result<Discovery, UsdtError> {
    let data = std::fs::read(path).map_err(|source| UsdtError::Read {
        path: path.display().to_string(),
        source,
    })?;
    discover(&data, &path.display().to_string())
}

pub fn discover(data: &[u8], path: &str) -> Result<Discovery, UsdtError> {
    if data.get(..4) != Some(b"\x7fELF") {
        return Err(UsdtError::NotElf {
            path: path.to_string(),
        });
    }
    let bad = |reason: String| UsdtError::BadElf {
        path: path.to_string(),
        reason,
    };
    let header = FileHeader64::<Endianness>::parse(data)
        .map_err(|error| bad(format!("not a 64-bit ELF: {error}")))?;
    let endian = header.endian().map_err(|error| bad(error.to_string()))?;
    if header.e_machine(endian) != object::elf::EM_X86_64 {
        return Err(bad(format!(
            "machine {} is not x86-64",
            header.e_machine(endian)
        )));
    }
    let segments: Vec<(u64, u64, u64, bool)> = header
        .program_headers(endian, data)
        .map_err(|error| bad(error.to_string()))?
        .iter()
        .filter(|segment| segment.p_type(endian) == PT_LOAD)
        .map(|segment| {
            (
                segment.p_vaddr(endian),
                segment.p_filesz(endian),
                segment.p_offset(endian),
                segment.p_flags(endian) & PF_X != 0,
            )
        })
        .collect();
    let file_offset = |address: u64, executable: bool| -> Option<u64> {
        segments
            .iter()
            .find_map(|(vaddr, filesz, offset, is_executable)| {
                // Checked arithmetic: headers come from the file and may be hostile.
                let delta = address.checked_sub(*vaddr)?;
                let inside = delta < *filesz && (*is_executable || !executable);
                inside.then(|| offset.checked_add(delta)).flatten()
            })
    };
    let sections = header
        .sections(endian, data)
        .map_err(|error| bad(error.to_string()))?;
    let base_section = sections
        .section_by_name(endian, b".stapsdt.base")
        .map(|(_, section)| section.sh_addr(endian));
    let mut discovery = Discovery::default();
    let Some((_, notes_section)) = sections.section_by_name(endian, b".note.stapsdt") else {
        return Ok(discovery);
    };
    let mut notes = notes_section
        .notes(endian, data)
        .map_err(|error| bad(format!(".note.stapsdt: {error}")))?
        .ok_or_else(|| bad(".note.stapsdt is not a note section".to_string()))?;
    while let Some(note) = notes
        .next()
        .map_err(|error| bad(format!(".note.stapsdt: {error}")))?
    {
        if note.name() != b"stapsdt" || note.n_type(endian) != NOTE_TYPE_STAPSDT {
            continue;
        }
        let description = note.desc();
        let word = |index: usize| -> Result<u64, UsdtError> {
            let bytes = description
                .read_bytes_at(index as u64 * 8, 8)
                .map_err(|_| bad("truncated stapsdt note".to_string()))?;
            Ok(u64::from_le_bytes(bytes.try_into().unwrap()))
        };
        let (note_address, note_base, semaphore_address) = (word(0)?, word(1)?, word(2)?);
        let mut strings = description[24..].split(|byte| *byte == 0);
        let mut text = || -> Result<String, UsdtError> {
            let bytes = strings
                .next()
                .ok_or_else(|| bad("truncated stapsdt note strings".to_string()))?;
            String::from_utf8(bytes.to_vec())
                .map_err(|_| bad("stapsdt note string is not UTF-8".to_string()))
        };
        let (provider, name, arguments_text) = (text()?, text()?, text()?);
        // Prelink may move the file after the notes were written; .stapsdt.base says by how much.
        let address = match base_section {
            Some(base) if note_base != 0 => note_address.wrapping_add(base).wrapping_sub(note_base),
            _ => note_address,
        };
        let live = match file_offset(address, true) {
            None => Err(DeadReason::NotInCode),
            Some(offset) if !is_nop(data.get(offset as usize..).unwrap_or_default()) => {
                Err(DeadReason::NotANop)
            }
            Some(offset) => Ok(offset),
        };
        let offset = match live {
            Ok(offset) => offset,
            Err(reason) => {
                discovery.dead_notes.push(DeadNote {
                    provider,
                    name,
                    address,
                    reason,
                });
                continue;
            }
        };
        let semaphore_offset = if semaphore_address == 0 {
            0
        } else {
            file_offset(semaphore_address, false).ok_or_else(|| {
                bad(format!(
                    "{provider}:{name}: semaphore {semaphore_address:#x} is in no segment"
                ))
            })?
        };
        let arguments = parse_arguments(&arguments_text).map_err(|(index, spec, reason)| {
            UsdtError::BadArgument {
                provider: provider.clone(),
                name: name.clone(),
                pc: address,
                index,
                spec,
                reason,
            }
        })?;
        discovery.sites.push(Site {
            provider,
            name,
            address,
            file_offset: offset,
            semaphore_address,
            semaphore_offset,
            arguments_text,
            arguments,
        });
    }
    Ok(discovery)
}

/// Whether `code` starts with an x86-64 `nop`: `90` (`<sys/sdt.h>`, the `usdt` crate, the first
/// byte of Linux 7.2's `nop; nop10` site) or a multi-byte `0f 1f` form (our 5-byte site), with
/// or without operand-size prefixes.
fn is_nop(code: &[u8]) -> bool {
    let unprefixed = code
        .iter()
        .position(|byte| *byte != 0x66)
        .unwrap_or(code.len());
    matches!(&code[unprefixed..], [0x90, ..] | [0x0f, 0x1f, ..])
}

/// Offsets of x86-64 registers in the kernel's `struct pt_regs`, by every name an argument spec
/// may use for them (64, 32, 16 and low 8 bits).
const REGISTERS: &[(&[&str], u16)] = &[
    (&["r15", "r15d", "r15w", "r15b"], 0),
    (&["r14", "r14d", "r14w", "r14b"], 8),
    (&["r13", "r13d", "r13w", "r13b"], 16),
    (&["r12", "r12d", "r12w", "r12b"], 24),
    (&["rbp", "ebp", "bp", "bpl"], 32),
    (&["rbx", "ebx", "bx", "bl"], 40),
    (&["r11", "r11d", "r11w", "r11b"], 48),
    (&["r10", "r10d", "r10w", "r10b"], 56),
    (&["r9", "r9d", "r9w", "r9b"], 64),
    (&["r8", "r8d", "r8w", "r8b"], 72),
    (&["rax", "eax", "ax", "al"], 80),
    (&["rcx", "ecx", "cx", "cl"], 88),
    (&["rdx", "edx", "dx", "dl"], 96),
    (&["rsi", "esi", "si", "sil"], 104),
    (&["rdi", "edi", "di", "dil"], 112),
    (&["rip", "eip"], 128),
    (&["rsp", "esp", "sp", "spl"], 152),
];

fn register_offset(name: &str) -> Option<u16> {
    REGISTERS
        .iter()
        .find(|(names, _)| names.contains(&name))
        .map(|(_, offset)| *offset)
}

fn parse_integer(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let magnitude = match digits.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<i64>().ok()?,
    };
    Some(if negative { -magnitude } else { magnitude })
}

/// Decodes one argument spec such as `8@%rdi`, `-4@-20(%rbp)` or `4@$5`.
pub fn parse_argument(spec: &str) -> Result<ArgSpec, String> {
    let (size, operand) = spec.split_once('@').ok_or("no size@ prefix")?;
    let size: i8 = size
        .parse()
        .map_err(|_| format!("size {size:?} is not a number"))?;
    if ![1, 2, 4, 8].contains(&size.unsigned_abs()) {
        return Err(format!("size {size} is not 1, 2, 4 or 8 bytes"));
    }
    let mut argument = ArgSpec {
        size,
        ..ArgSpec::default()
    };
    if let Some(constant) = operand.strip_prefix('$') {
        argument.kind = ARG_CONSTANT;
        argument.value = parse_integer(constant)
            .ok_or_else(|| format!("constant {constant:?} is not an integer"))?;
    } else if let Some(register) = operand.strip_prefix('%') {
        argument.kind = ARG_REGISTER;
        argument.register_offset =
            register_offset(register).ok_or_else(|| format!("unknown register %{register}"))?;
    } else if let Some((displacement, rest)) = operand.split_once("(%") {
        let register = rest
            .strip_suffix(')')
            .ok_or("unterminated memory operand")?;
        if register.contains(',') {
            return Err("indexed memory operands are not supported".to_string());
        }
        argument.kind = ARG_REGISTER_DEREF;
        argument.register_offset =
            register_offset(register).ok_or_else(|| format!("unknown register %{register}"))?;
        argument.value = if displacement.is_empty() {
            0
        } else {
            parse_integer(displacement).ok_or_else(|| {
                format!(
                    "displacement {displacement:?} is not an integer (symbols are not supported)"
                )
            })?
        };
    } else {
        return Err("unsupported operand form".to_string());
    }
    Ok(argument)
}

/// Decodes a whole argument string; errors name the argument's index and text.
pub fn parse_arguments(text: &str) -> Result<Vec<ArgSpec>, (usize, String, String)> {
    let specs: Vec<&str> = text.split_whitespace().collect();
    if specs.len() > ARGS_MAX {
        return Err((
            ARGS_MAX,
            text.to_string(),
            format!("{} arguments; at most {ARGS_MAX}", specs.len()),
        ));
    }
    specs
        .iter()
        .enumerate()
        .map(|(index, spec)| {
            parse_argument(spec).map_err(|reason| (index, spec.to_string(), reason))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operand_form_libbpf_handles() {
        let register = parse_argument("8@%rdi").unwrap();
        assert_eq!(
            (register.kind, register.register_offset, register.size),
            (ARG_REGISTER, 112, 8)
        );
        let sub_register = parse_argument("-4@%eax").unwrap();
        assert_eq!((sub_register.register_offset, sub_register.size), (80, -4));
        let byte = parse_argument("1@%dil").unwrap();
        assert_eq!((byte.register_offset, byte.size), (112, 1));
        let deref = parse_argument("-4@-20(%rbp)").unwrap();
        assert_eq!(
            (deref.kind, deref.register_offset, deref.value, deref.size),
            (ARG_REGISTER_DEREF, 32, -20, -4)
        );
        let plain_deref = parse_argument("8@(%rsp)").unwrap();
        assert_eq!(
            (plain_deref.kind, plain_deref.value),
            (ARG_REGISTER_DEREF, 0)
        );
        let constant = parse_argument("-4@$-5").unwrap();
        assert_eq!((constant.kind, constant.value), (ARG_CONSTANT, -5));
        let hex = parse_argument("8@0x10(%r12)").unwrap();
        assert_eq!((hex.register_offset, hex.value), (24, 16));
    }

    #[test]
    fn undecodable_specs_are_refused_with_a_reason() {
        for spec in [
            "8%rdi",
            "3@%rdi",
            "8@%xmm0",
            "8@sym(%rip)",
            "8@8(%rax,%rbx,2)",
            "8@rdi",
            "x@%rdi",
        ] {
            assert!(parse_argument(spec).is_err(), "{spec} accepted");
        }
        let (index, spec, _) = parse_arguments("8@%rdi 8@%xmm1").unwrap_err();
        assert_eq!((index, spec.as_str()), (1, "8@%xmm1"));
    }

    #[test]
    fn nops_are_sites_and_other_code_is_not() {
        let nops: [&[u8]; 4] = [
            &[0x90, 0xc3],
            &[0x0f, 0x1f, 0x44, 0x00, 0x00],
            &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
            &[0x66, 0x90],
        ];
        for code in nops {
            assert!(is_nop(code), "{code:02x?}");
        }
        let other: [&[u8]; 5] = [&[], &[0x66], &[0xc3], &[0x48, 0x89, 0xe5], &[0x0f, 0x05]];
        for code in other {
            assert!(!is_nop(code), "{code:02x?}");
        }
    }

    #[test]
    fn non_elf_input_is_an_error_not_a_panic() {
        assert!(matches!(
            discover(b"hello world", "x"),
            Err(UsdtError::NotElf { .. })
        ));
        assert!(matches!(
            discover(b"\x7fELF\x01", "x"),
            Err(UsdtError::BadElf { .. })
        ));
        let mut truncated = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        truncated.truncate(200);
        assert!(discover(&truncated, "x").is_err());
    }

    /// Inputs the fuzzer once crashed on stay in the tree, so the fix cannot regress silently.
    #[test]
    fn fuzzer_findings_do_not_panic() {
        let directory = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/regressions");
        let mut seen = 0;
        for entry in std::fs::read_dir(directory).unwrap() {
            let path = entry.unwrap().path();
            let _ = discover(&std::fs::read(&path).unwrap(), "regression");
            seen += 1;
        }
        assert!(seen > 0, "no regression inputs in {directory}");
    }
}
