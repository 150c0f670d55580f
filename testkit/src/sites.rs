//! Static checks of a binary's probe sites, read with binutils (`readelf`, `objdump`) rather
//! than vsrscope's own note parser, so a bug there cannot hide a bad site.

use std::path::Path;
use std::process::Command;

/// Runs a binutils tool and returns its standard output.
fn binutils(tool: &str, arguments: &[&str], binary: &Path) -> String {
    let output = Command::new(tool)
        .args(arguments)
        .arg(binary)
        .output()
        .unwrap_or_else(|error| panic!("{tool} (binutils) is installed: {error}"));
    assert!(
        output.status.success(),
        "{tool} {}: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The address of every stapsdt note (`Location:` in `readelf -n`), dead ones included.
pub fn note_locations(binary: &Path) -> Vec<u64> {
    binutils("readelf", &["--notes", "--wide"], binary)
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Location: 0x"))
        .map(|rest| {
            let hex = rest.split(',').next().unwrap();
            u64::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("bad location {rest:?}"))
        })
        .collect()
}

/// One function of an `objdump -d` listing: its name and its instructions with their addresses.
struct Function {
    name: String,
    start: u64,
    instructions: Vec<(u64, String)>,
}

fn disassemble(binary: &Path) -> Vec<Function> {
    let mut functions: Vec<Function> = Vec::new();
    for line in binutils("objdump", &["-d", "-w", "--no-show-raw-insn"], binary).lines() {
        if let Some((address, rest)) = line.split_once(" <")
            && let Some(name) = rest.strip_suffix(">:")
            && let Ok(start) = u64::from_str_radix(address, 16)
        {
            functions.push(Function {
                name: name.to_string(),
                start,
                instructions: Vec::new(),
            });
        } else if let Some((address, text)) = line.trim_start().split_once(":\t")
            && let Ok(address) = u64::from_str_radix(address, 16)
            && let Some(function) = functions.last_mut()
        {
            function.instructions.push((address, text.to_string()));
        }
    }
    functions.sort_by_key(|function| function.start);
    functions
}

/// Whether an instruction addresses memory below the stack pointer: a `-0x…(%rsp…)` operand.
fn below_stack_pointer(instruction: &str) -> bool {
    instruction.match_indices("(%rsp").any(|(at, _)| {
        let before = &instruction[..at];
        let digits = before.trim_end_matches(|c: char| c.is_ascii_hexdigit());
        digits.len() < before.len() && digits.ends_with("-0x")
    })
}

/// What [`red_zone_sites`] found.
#[derive(Debug)]
pub struct RedZoneReport {
    /// Sites found inside a function of the listing (dead notes point at none).
    pub checked: usize,
    /// One line per site whose function touches memory below `%rsp`: the site, the function
    /// and the first such instruction.
    pub offending: Vec<String>,
}

/// Checks every probe site of `binary`: the function holding it must never touch the red zone
/// (the 128 bytes below `%rsp`), because an attached uprobe on a 5-byte `nop` becomes a `call`
/// that pushes its return address there (Linux ≥ 6.17), overwriting whatever the function kept.
pub fn red_zone_sites(binary: &Path) -> RedZoneReport {
    let functions = disassemble(binary);
    let mut report = RedZoneReport {
        checked: 0,
        offending: Vec::new(),
    };
    for site in note_locations(binary) {
        let index = functions.partition_point(|function| function.start <= site);
        let Some(function) = index.checked_sub(1).map(|index| &functions[index]) else {
            continue;
        };
        if !function
            .instructions
            .iter()
            .any(|(address, _)| *address == site)
        {
            continue;
        }
        report.checked += 1;
        if let Some((address, instruction)) = function
            .instructions
            .iter()
            .find(|(_, instruction)| below_stack_pointer(instruction))
        {
            report.offending.push(format!(
                "site {site:#x} in {}: {address:#x} {instruction}",
                function.name
            ));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::below_stack_pointer;

    #[test]
    fn red_zone_operands_are_recognised() {
        assert!(below_stack_pointer("mov    %rax,-0x8(%rsp)"));
        assert!(below_stack_pointer("movdqu %xmm1,-0x20(%rsp)"));
        assert!(below_stack_pointer("lea    -0x28(%rsp),%rax"));
        assert!(below_stack_pointer("mov    -0x10(%rsp,%rcx,8),%rax"));
        assert!(!below_stack_pointer("mov    %rax,0x8(%rsp)"));
        assert!(!below_stack_pointer("mov    %rax,(%rsp)"));
        assert!(!below_stack_pointer("mov    -0x8(%rbp),%rax"));
        assert!(!below_stack_pointer("sub    $0x28,%rsp"));
    }
}
