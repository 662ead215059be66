//! Why a store could not be opened ([`OpenError`]). The errors of an operation are in
//! [`crate::error`], so that the value types can name them without depending on the stores.

use std::path::{Path, PathBuf};

use crate::error::BoxError;

/// Why a store could not be opened. Every variant names the file (for PostgreSQL:
/// `postgres://user@host:port/db?schema=…`, never with the password).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The directory that should hold the file does not exist.
    #[error("cannot open {path}: its directory does not exist; create it first")]
    MissingDirectory {
        /// The file.
        path: PathBuf,
    },
    /// The file or its directory cannot be written: this process lacks permission, or the file
    /// system is read-only. (SQLite also needs to create `-wal` and `-shm` files next to it.)
    #[error("cannot write {path}: check the permissions of the file and its directory")]
    ReadOnly {
        /// The file.
        path: PathBuf,
    },
    /// Another process holds the file (redb allows one process at a time).
    #[error(
        "{path} is in use by another process; stop it, or use the SQLite backend to share a file between processes"
    )]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// The file exists but is not an apikeys database of this backend.
    #[error("{path} is not an apikeys {backend} database; refusing to touch it")]
    NotApikeys {
        /// The file.
        path: PathBuf,
        /// `"sqlite"` or `"redb"`.
        backend: &'static str,
    },
    /// The file was written by a newer version of apikeys.
    #[error(
        "{path} has schema version {found}, newer than the {supported} this version of apikeys understands: upgrade apikeys"
    )]
    SchemaTooNew {
        /// The file.
        path: PathBuf,
        /// The version recorded in the file.
        found: u64,
        /// The newest version this build understands.
        supported: u64,
    },
    /// The disk is full.
    #[error("cannot write {path}: the disk is full")]
    DiskFull {
        /// The file.
        path: PathBuf,
    },
    /// Anything else; the source says what.
    #[error("cannot open {path}")]
    Other {
        /// The file.
        path: PathBuf,
        /// What the backend reported.
        #[source]
        source: BoxError,
    },
}

impl OpenError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::MissingDirectory { path }
            | Self::ReadOnly { path }
            | Self::InUse { path }
            | Self::NotApikeys { path, .. }
            | Self::SchemaTooNew { path, .. }
            | Self::DiskFull { path }
            | Self::Other { path, .. } => path,
        }
    }

    /// Checks, before a backend would fail obscurely, that the file's directory exists.
    #[cfg(any(feature = "sqlite", feature = "redb"))]
    pub(crate) fn check_directory(path: &Path) -> Result<(), Self> {
        match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() && !parent.is_dir() => {
                Err(Self::MissingDirectory { path: path.to_owned() })
            }
            _ => Ok(()),
        }
    }
}
