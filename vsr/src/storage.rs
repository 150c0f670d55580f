//! Storage injected into the replica: byte zones (journal, superblock, two checkpoint slots) with positional
//! reads and writes and an explicit durability barrier. Files in production, memory with crash
//! and corruption faults in the simulator; the journal and superblock code above is the same.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Zone {
    Journal,
    Superblock,
    /// One of two slots: a new checkpoint is written to the slot the superblock does not
    /// reference, so a crash while writing it leaves the previous one intact.
    Checkpoint(u8),
}

pub const CHECKPOINT_SLOTS: u8 = 2;

pub trait Storage {
    /// Reads up to `buffer.len()` bytes at `offset`; fewer only at the end of the zone.
    fn read_at(&mut self, zone: Zone, offset: u64, buffer: &mut [u8]) -> io::Result<usize>;
    fn write_at(&mut self, zone: Zone, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Returns once everything written to `zone` before it is durable.
    fn sync(&mut self, zone: Zone) -> io::Result<()>;
    fn size(&mut self, zone: Zone) -> io::Result<u64>;
}

/// Reads exactly `buffer.len()` bytes, or reports how many were there.
pub fn read_exact_at(
    storage: &mut impl Storage,
    zone: Zone,
    offset: u64,
    buffer: &mut [u8],
) -> io::Result<bool> {
    let mut done = 0;
    while done < buffer.len() {
        let read = storage.read_at(zone, offset + done as u64, &mut buffer[done..])?;
        if read == 0 {
            return Ok(false);
        }
        done += read;
    }
    Ok(true)
}

/// The production storage: `journal.vsr`, `superblock.vsr` and `checkpoint-{0,1}.vsr` in a
/// data directory.
#[derive(Debug)]
pub struct FileStorage {
    journal: File,
    superblock: File,
    checkpoints: [File; CHECKPOINT_SLOTS as usize],
}

impl FileStorage {
    pub const JOURNAL_FILE: &'static str = "journal.vsr";
    pub const SUPERBLOCK_FILE: &'static str = "superblock.vsr";
    pub const CHECKPOINT_FILES: [&'static str; CHECKPOINT_SLOTS as usize] =
        ["checkpoint-0.vsr", "checkpoint-1.vsr"];

    /// Creates a data directory's files, durably: the files and the directory entry naming them
    /// are synced. Refuses a directory that already holds a replica's files.
    pub fn create(directory: &Path) -> io::Result<FileStorage> {
        std::fs::create_dir_all(directory)?;
        let names = [Self::JOURNAL_FILE, Self::SUPERBLOCK_FILE]
            .into_iter()
            .chain(Self::CHECKPOINT_FILES);
        for name in names {
            if directory.join(name).exists() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} already holds a replica ({name} exists); formatting never overwrites one",
                        directory.display()
                    ),
                ));
            }
        }
        let storage = Self::open_files(directory, true)?;
        storage.journal.sync_all()?;
        storage.superblock.sync_all()?;
        for file in &storage.checkpoints {
            file.sync_all()?;
        }
        File::open(directory)?.sync_all()?;
        Ok(storage)
    }

    /// Opens a formatted data directory's files; never creates them.
    pub fn open(directory: &Path) -> io::Result<FileStorage> {
        if !directory.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} is not a directory: create the replica with `vsr-replica format`",
                    directory.display()
                ),
            ));
        }
        Self::open_files(directory, false)
    }

    fn open_files(directory: &Path, create: bool) -> io::Result<FileStorage> {
        let open = |name: &str| -> io::Result<File> {
            let path: PathBuf = directory.join(name);
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(create)
                .open(&path)
                .map_err(|error| {
                    let hint = if error.kind() == io::ErrorKind::NotFound {
                        ": not formatted; create the replica with `vsr-replica format`"
                    } else {
                        ""
                    };
                    io::Error::new(error.kind(), format!("{}: {error}{hint}", path.display()))
                })
        };
        Ok(FileStorage {
            journal: open(Self::JOURNAL_FILE)?,
            superblock: open(Self::SUPERBLOCK_FILE)?,
            checkpoints: [
                open(Self::CHECKPOINT_FILES[0])?,
                open(Self::CHECKPOINT_FILES[1])?,
            ],
        })
    }

    fn file(&self, zone: Zone) -> &File {
        match zone {
            Zone::Journal => &self.journal,
            Zone::Superblock => &self.superblock,
            Zone::Checkpoint(slot) => &self.checkpoints[usize::from(slot)],
        }
    }
}

impl Storage for FileStorage {
    fn read_at(&mut self, zone: Zone, offset: u64, buffer: &mut [u8]) -> io::Result<usize> {
        self.file(zone).read_at(buffer, offset)
    }

    fn write_at(&mut self, zone: Zone, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.file(zone).write_all_at(bytes, offset)
    }

    fn sync(&mut self, zone: Zone) -> io::Result<()> {
        self.file(zone).sync_data()
    }

    fn size(&mut self, zone: Zone) -> io::Result<u64> {
        Ok(self.file(zone).metadata()?.len())
    }
}
