//! Storage injected into the replica: two byte zones (journal and superblock) with positional
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
}

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

/// The production storage: `journal.vsr` and `superblock.vsr` in a data directory.
#[derive(Debug)]
pub struct FileStorage {
    journal: File,
    superblock: File,
}

impl FileStorage {
    pub const JOURNAL_FILE: &'static str = "journal.vsr";
    pub const SUPERBLOCK_FILE: &'static str = "superblock.vsr";

    pub fn open(directory: &Path) -> io::Result<FileStorage> {
        std::fs::create_dir_all(directory)?;
        let open = |name: &str| -> io::Result<File> {
            let path: PathBuf = directory.join(name);
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|error| {
                    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
                })
        };
        Ok(FileStorage {
            journal: open(Self::JOURNAL_FILE)?,
            superblock: open(Self::SUPERBLOCK_FILE)?,
        })
    }

    fn file(&self, zone: Zone) -> &File {
        match zone {
            Zone::Journal => &self.journal,
            Zone::Superblock => &self.superblock,
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
