//! The `file:///dir` URL and the directory it names.

use std::path::{Path, PathBuf};

use distlock_core::error::redact_url;
use distlock_core::{Error, Result};

/// Where a [`FileLock`](crate::FileLock) keeps its lock files.
///
/// ```
/// use distlock_file::FileConfig;
///
/// let config = FileConfig::from_url("file:///var/lock/myapp").unwrap();
/// assert_eq!(config.dir, std::path::Path::new("/var/lock/myapp"));
/// config.validate().unwrap();
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileConfig {
    /// The directory of the lock files and the fencing counter, created if
    /// missing. It belongs to distlock: nothing else should rename or
    /// delete files in it.
    pub dir: PathBuf,
}

impl FileConfig {
    /// Lock files in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileConfig { dir: dir.into() }
    }

    /// Parses `file:///some/dir` (the host empty or `localhost`). The file
    /// backend takes no URL options: any `?name=value` is refused.
    pub fn from_url(url: &str) -> Result<Self> {
        let redacted = redact_url(url);
        let parsed = url::Url::parse(url)
            .map_err(|err| Error::invalid_url(&redacted, format!("not a URL: {err}")))?;
        if parsed.scheme() != "file" {
            return Err(Error::invalid_url(
                &redacted,
                "expected file:///absolute/directory",
            ));
        }
        match parsed.host_str() {
            None | Some("") | Some("localhost") => {}
            Some(host) => {
                return Err(Error::invalid_url(
                    &redacted,
                    format!("file locks are local: the host must be empty or localhost, not `{host}` (write file:///dir)"),
                ))
            }
        }
        if let Some((name, _)) = parsed.query_pairs().next() {
            return Err(Error::invalid_url(
                &redacted,
                format!("unknown option {name:?}: the file backend takes no options"),
            ));
        }
        let dir = parsed.to_file_path().map_err(|()| {
            Error::invalid_url(&redacted, "expected an absolute directory, file:///dir")
        })?;
        if is_unusable(&dir) {
            return Err(Error::invalid_url(
                &redacted,
                "name a directory for the lock files, e.g. file:///tmp/distlock",
            ));
        }
        Ok(FileConfig::new(dir))
    }

    /// Checks that `dir` names a directory of its own: not empty and not
    /// the root.
    pub fn validate(&self) -> Result<()> {
        if is_unusable(&self.dir) {
            return Err(Error::InvalidConfig(format!(
                "dir must name a directory for the lock files (not empty, not /), got {:?}",
                self.dir
            )));
        }
        Ok(())
    }
}

/// An empty path (which would mean the working directory) or the root.
fn is_unusable(dir: &Path) -> bool {
    dir.as_os_str().is_empty() || dir == Path::new("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_local_directory() {
        let config = FileConfig::from_url("file:///tmp/distlock-x").expect("file URL");
        assert_eq!(config, FileConfig::new("/tmp/distlock-x"));
        let config = FileConfig::from_url("file://localhost/tmp/a%20b").expect("localhost");
        assert_eq!(config.dir, Path::new("/tmp/a b"));
        for bad in [
            "file://otherhost/tmp/x",
            "file:///",
            "redis://x",
            "file:",
            "file:///tmp/x?colour=blue",
        ] {
            let err = FileConfig::from_url(bad).expect_err(bad);
            assert!(matches!(err, Error::InvalidUrl { .. }), "{bad}: {err}");
        }
        let err = FileConfig::from_url("file:///tmp/x?colour=blue").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn validate_names_the_bad_dir() {
        FileConfig::new("/tmp/distlock").validate().unwrap();
        FileConfig::new("relative/locks").validate().unwrap();
        for bad in ["", "/"] {
            let err = FileConfig::new(bad).validate().unwrap_err();
            assert!(
                matches!(&err, Error::InvalidConfig(text) if text.contains("dir")),
                "{err}"
            );
        }
    }
}
