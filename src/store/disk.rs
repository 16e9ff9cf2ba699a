//! The file layer under the embedded store's own files (the write-ahead
//! log and the audit journal; sled keeps its own): every read, write, sync,
//! create and delete they make goes through [`Disk`].
//!
//! Why: crash consistency cannot be tested on a real disk, which neither
//! crashes on cue nor loses, tears or reorders writes when asked. A test
//! replaces [`OsDisk`] with a simulated disk that does all of that (see
//! `tests/crash.rs`), as redb tests its crash safety through its storage
//! backend trait. Production only ever uses [`OsDisk`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenMode {
    /// Create it if it does not exist.
    pub create: bool,
    /// Cut it to nothing.
    pub truncate: bool,
    /// Writes go straight to the device and are durable when they return
    /// (`O_DIRECT | O_DSYNC`): whole aligned blocks from aligned memory
    /// only. A disk that cannot do it refuses the open.
    pub direct: bool,
}

impl OpenMode {
    /// An existing file.
    pub const EXISTING: OpenMode = OpenMode {
        create: false,
        truncate: false,
        direct: false,
    };
    /// The file, created empty if absent.
    pub const CREATE: OpenMode = OpenMode {
        create: true,
        truncate: false,
        direct: false,
    };
    /// A new, empty file (an old one is cut).
    pub const NEW: OpenMode = OpenMode {
        create: true,
        truncate: true,
        direct: false,
    };
}

/// A directory of files, as the store's own files see it.
pub trait Disk: Send + Sync + 'static {
    /// Opens `path` as `mode` says.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>>;
    /// The whole content of `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Deletes `path`; durable only after [`Disk::sync_dir`].
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Names of the files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Makes the creations and deletions in `dir` so far durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// An open file.
pub trait DiskFile: Send + Sync {
    /// Fills `buf` from offset `off` (an error if the file ends first).
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes all of `buf` at `off`; durable only after [`DiskFile::sync`]
    /// unless the file was opened direct.
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Makes the writes so far durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    /// Its length.
    fn len(&self) -> io::Result<u64>;
    /// Whether it is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Cuts (or extends with zeroes) it to `len`.
    fn set_len(&self, len: u64) -> io::Result<()>;
}

/// The operating system's file system: what the store uses outside tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsDisk;

impl Disk for OsDisk {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn DiskFile>> {
        let flags = if mode.direct {
            (rustix::fs::OFlags::DIRECT | rustix::fs::OFlags::DSYNC).bits() as i32
        } else {
            0
        };
        let file = OpenOptions::new()
            .read(!mode.direct)
            .write(true)
            .create(mode.create)
            .truncate(mode.truncate)
            .custom_flags(flags)
            .open(path)?;
        Ok(Arc::new(OsFile(file)))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                out.push(name.to_owned());
            }
        }
        Ok(out)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// A file of [`OsDisk`].
struct OsFile(File);

impl DiskFile for OsFile {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.0, buf, off)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.0, buf, off)
    }

    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}
