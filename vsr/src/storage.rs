//! Storage injected into the replica: byte zones (journal, superblock, two checkpoint slots) with positional
//! reads and writes and an explicit durability barrier. Files in production, memory with crash
//! and corruption faults in the simulator; the journal and superblock code above is the same.

use std::collections::{BTreeMap, BTreeSet};
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
    /// Frees the bytes of `zone` below `offset` (whole journal segments in production); they
    /// are never read again, and the offsets of the rest do not move.
    fn discard(&mut self, zone: Zone, offset: u64) -> io::Result<()>;
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

/// The journal's bytes live in segment files of this size, so that what a checkpoint covers is
/// freed by deleting whole files while every record keeps its offset.
pub const JOURNAL_SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// The production storage in a data directory: `superblock.vsr`, `checkpoint-{0,1}.vsr`, and
/// the journal as `journal-NNNNNNNNNN.vsr` segments (segment `n` holds the journal's bytes from
/// `n * JOURNAL_SEGMENT_BYTES`).
#[derive(Debug)]
pub struct FileStorage {
    directory: PathBuf,
    segments: BTreeMap<u64, File>,
    /// Segments written since the last journal sync.
    unsynced_segments: BTreeSet<u64>,
    superblock: File,
    checkpoints: [File; CHECKPOINT_SLOTS as usize],
}

impl FileStorage {
    pub const SUPERBLOCK_FILE: &'static str = "superblock.vsr";
    pub const CHECKPOINT_FILES: [&'static str; CHECKPOINT_SLOTS as usize] =
        ["checkpoint-0.vsr", "checkpoint-1.vsr"];

    /// The file holding journal segment `index`.
    pub fn journal_segment_file(index: u64) -> String {
        format!("journal-{index:010}.vsr")
    }

    fn segment_index(name: &str) -> Option<u64> {
        name.strip_prefix("journal-")?
            .strip_suffix(".vsr")?
            .parse()
            .ok()
    }

    /// Creates a data directory's files, durably: the files and the directory entry naming them
    /// are synced. Refuses a directory that already holds a replica's files.
    pub fn create(directory: &Path) -> io::Result<FileStorage> {
        std::fs::create_dir_all(directory)?;
        let names = [
            Self::SUPERBLOCK_FILE,
            Self::CHECKPOINT_FILES[0],
            Self::CHECKPOINT_FILES[1],
        ];
        let existing = std::fs::read_dir(directory)?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .find(|name| names.contains(&name.as_str()) || Self::segment_index(name).is_some());
        if let Some(name) = existing {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} already holds a replica ({name} exists); formatting never overwrites one",
                    directory.display()
                ),
            ));
        }
        let storage = Self::open_files(directory, true)?;
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

    fn open_file(directory: &Path, name: &str, create: bool) -> io::Result<File> {
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
    }

    fn open_files(directory: &Path, create: bool) -> io::Result<FileStorage> {
        let mut segments = BTreeMap::new();
        for entry in std::fs::read_dir(directory)? {
            let name = entry?.file_name();
            if let Some(index) = name.to_str().and_then(Self::segment_index) {
                segments.insert(
                    index,
                    Self::open_file(directory, name.to_str().unwrap(), false)?,
                );
            }
        }
        Ok(FileStorage {
            directory: directory.to_path_buf(),
            segments,
            unsynced_segments: BTreeSet::new(),
            superblock: Self::open_file(directory, Self::SUPERBLOCK_FILE, create)?,
            checkpoints: [
                Self::open_file(directory, Self::CHECKPOINT_FILES[0], create)?,
                Self::open_file(directory, Self::CHECKPOINT_FILES[1], create)?,
            ],
        })
    }

    fn file(&self, zone: Zone) -> &File {
        match zone {
            Zone::Journal => unreachable!("the journal is segmented"),
            Zone::Superblock => &self.superblock,
            Zone::Checkpoint(slot) => &self.checkpoints[usize::from(slot)],
        }
    }

    fn segment(&mut self, index: u64) -> io::Result<&File> {
        if !self.segments.contains_key(&index) {
            let name = Self::journal_segment_file(index);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.directory.join(&name))?;
            // A new file's directory entry must survive a crash with the bytes synced into it.
            File::open(&self.directory)?.sync_all()?;
            self.segments.insert(index, file);
        }
        Ok(&self.segments[&index])
    }
}

impl Storage for FileStorage {
    fn read_at(&mut self, zone: Zone, offset: u64, buffer: &mut [u8]) -> io::Result<usize> {
        if zone != Zone::Journal {
            return self.file(zone).read_at(buffer, offset);
        }
        let index = offset / JOURNAL_SEGMENT_BYTES;
        let within = offset % JOURNAL_SEGMENT_BYTES;
        let Some(file) = self.segments.get(&index) else {
            return Ok(0);
        };
        let length = buffer.len().min((JOURNAL_SEGMENT_BYTES - within) as usize);
        let read = file.read_at(&mut buffer[..length], within)?;
        // A read that ends exactly at a segment's end continues in the next one.
        if read == length && length < buffer.len() {
            return Ok(read + self.read_at(zone, offset + read as u64, &mut buffer[read..])?);
        }
        Ok(read)
    }

    fn write_at(&mut self, zone: Zone, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if zone != Zone::Journal {
            return self.file(zone).write_all_at(bytes, offset);
        }
        let mut written = 0;
        while written < bytes.len() {
            let at = offset + written as u64;
            let within = at % JOURNAL_SEGMENT_BYTES;
            let length = (bytes.len() - written).min((JOURNAL_SEGMENT_BYTES - within) as usize);
            let index = at / JOURNAL_SEGMENT_BYTES;
            self.segment(index)?
                .write_all_at(&bytes[written..written + length], within)?;
            self.unsynced_segments.insert(index);
            written += length;
        }
        Ok(())
    }

    fn sync(&mut self, zone: Zone) -> io::Result<()> {
        if zone != Zone::Journal {
            return self.file(zone).sync_data();
        }
        for index in std::mem::take(&mut self.unsynced_segments) {
            if let Some(file) = self.segments.get(&index) {
                file.sync_data()?;
            }
        }
        Ok(())
    }

    fn size(&mut self, zone: Zone) -> io::Result<u64> {
        if zone != Zone::Journal {
            return Ok(self.file(zone).metadata()?.len());
        }
        match self.segments.last_key_value() {
            Some((index, file)) => Ok(index * JOURNAL_SEGMENT_BYTES + file.metadata()?.len()),
            None => Ok(0),
        }
    }

    fn discard(&mut self, zone: Zone, offset: u64) -> io::Result<()> {
        assert_eq!(zone, Zone::Journal, "only the journal is discarded");
        let below = offset / JOURNAL_SEGMENT_BYTES;
        let discarded: Vec<u64> = self
            .segments
            .range(..below)
            .map(|(index, _)| *index)
            .collect();
        for index in &discarded {
            self.segments.remove(index);
            std::fs::remove_file(self.directory.join(Self::journal_segment_file(*index)))?;
        }
        if !discarded.is_empty() {
            File::open(&self.directory)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_bytes_span_segments_and_discarding_deletes_whole_segments() {
        let directory = std::env::temp_dir().join(format!("vsr-storage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        let mut storage = FileStorage::create(&directory).unwrap();
        let boundary = JOURNAL_SEGMENT_BYTES;
        let bytes: Vec<u8> = (0..32u8).collect();
        // Sparse: only the written stretch of each segment takes disk.
        storage
            .write_at(Zone::Journal, boundary - 16, &bytes)
            .unwrap();
        storage
            .write_at(Zone::Journal, 2 * boundary + 4, &bytes)
            .unwrap();
        storage.sync(Zone::Journal).unwrap();
        let mut storage = FileStorage::open(&directory).unwrap();
        assert_eq!(storage.size(Zone::Journal).unwrap(), 2 * boundary + 36);
        let mut read_back = [0u8; 32];
        assert!(read_exact_at(&mut storage, Zone::Journal, boundary - 16, &mut read_back).unwrap());
        assert_eq!(&read_back[..], &bytes[..]);
        storage.discard(Zone::Journal, 2 * boundary + 4).unwrap();
        for index in 0..2 {
            assert!(
                !directory
                    .join(FileStorage::journal_segment_file(index))
                    .exists()
            );
        }
        assert!(
            read_exact_at(
                &mut storage,
                Zone::Journal,
                2 * boundary + 4,
                &mut read_back
            )
            .unwrap()
        );
        assert_eq!(&read_back[..], &bytes[..]);
        assert_eq!(
            storage.read_at(Zone::Journal, 0, &mut read_back).unwrap(),
            0,
            "discarded"
        );
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
