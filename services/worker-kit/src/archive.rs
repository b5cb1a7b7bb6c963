//! Workspace snapshots as gzip tar archives (format 1 of spec §1.7: `.clawdbot` and `workspace`
//! under the data directory), and their safe restoration (spec §4.3 step 6a).
//!
//! Packing never follows symlinks: a link is stored as a link, so a link pointing outside the
//! data directory cannot pull outside files into a snapshot. Unpacking verifies the checksum
//! before touching the destination, refuses absolute paths, `..` components and writes through
//! links, bounds the unpacked size, and stages everything so that a failure leaves the
//! destination as it was.
//!
//! Both directions are blocking (file system and compression work): call them from
//! `tokio::task::spawn_blocking` in async code.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};
use tar::{Archive, Builder, EntryType, Header, HeaderMode};
use tokio::io::AsyncReadExt;

/// The top-level entries of a format-1 snapshot, relative to the data directory.
pub const SNAPSHOT_ENTRIES: [&str; 2] = [".clawdbot", "workspace"];

/// Paths (relative to the data directory) a snapshot leaves out by default: downloaded
/// attachments are already in blob storage and logs are not state (spec §6.4 D3).
pub const DEFAULT_EXCLUDES: [&str; 2] = ["workspace/.telegram-attachments", ".clawdbot/logs"];

/// Default bound on the bytes an archive may unpack to.
pub const DEFAULT_MAX_UNPACKED_BYTES: u64 = 8 * 1024 * 1024 * 1024;

/// Default bound on the number of entries an archive may hold.
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;

const BUF_SIZE: usize = 64 * 1024;
const STAGING_PREFIX: &str = ".af-unpack-";
const PACK_TMP_PREFIX: &str = ".af-pack-";

/// What was packed or unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSummary {
    /// SHA-256 of the whole archive file, lowercase hex.
    pub sha256: String,
    /// Size of the archive file (compressed).
    pub size_bytes: u64,
    /// Entries written: regular files, directories, symlinks and hard links.
    pub files: u64,
}

/// Options of [`pack_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackOptions {
    /// Paths relative to the data directory (`/`-separated) left out of the archive together
    /// with everything below them.
    pub exclude: Vec<String>,
}

impl Default for PackOptions {
    fn default() -> Self {
        Self { exclude: DEFAULT_EXCLUDES.iter().map(|s| (*s).to_string()).collect() }
    }
}

/// Options of [`unpack_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Upper bound on the sum of the sizes of the regular files in the archive.
    pub max_unpacked_bytes: u64,
    /// Upper bound on the number of entries in the archive.
    pub max_entries: u64,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        Self { max_unpacked_bytes: DEFAULT_MAX_UNPACKED_BYTES, max_entries: DEFAULT_MAX_ENTRIES }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("restore checksum mismatch: expected sha256 {expected}, archive has {actual}")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("invalid top-level entry {0:?}: must be a single plain path component")]
    InvalidEntry(String),
    #[error("refusing archive entry {path:?}: {reason}")]
    UnsafeEntry { path: String, reason: &'static str },
    #[error("archive entry {path:?} has an unsupported type ({kind})")]
    UnsupportedEntry { path: String, kind: String },
    #[error("archive unpacks to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("archive holds more than {limit} entries")]
    TooManyEntries { limit: u64 },
    #[error("{} changed while it was being packed", path.display())]
    Changed { path: PathBuf },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ArchiveError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ArchiveError> {
        self.map_err(|source| ArchiveError::Io { context: context(), source })
    }
}

/// [`pack_with`] with the default options (attachments and logs excluded).
pub fn pack(data_dir: &Path, entries: &[&str], out: &Path) -> Result<ArchiveSummary, ArchiveError> {
    pack_with(data_dir, entries, out, &PackOptions::default())
}

/// Writes a gzip tar of the top-level `entries` of `data_dir` to `out`.
///
/// Paths in the archive are relative to `data_dir`. A missing entry is skipped. Directories are
/// walked in sorted order so that equal trees give equal archives (modulo mtimes). Sockets,
/// FIFOs and devices are skipped. `out` appears only once complete (written next to it, then
/// renamed); it may live inside a packed entry, in which case it is not packed into itself.
pub fn pack_with(
    data_dir: &Path,
    entries: &[&str],
    out: &Path,
    options: &PackOptions,
) -> Result<ArchiveSummary, ArchiveError> {
    for entry in entries {
        validate_entry_name(entry)?;
    }
    let excludes: Vec<PathBuf> = options
        .exclude
        .iter()
        .map(|e| Path::new(e).components().filter(|c| matches!(c, Component::Normal(_))).collect::<PathBuf>())
        .filter(|p| !p.as_os_str().is_empty())
        .collect();

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(PACK_TMP_PREFIX)
        .tempfile_in(parent)
        .ctx(|| format!("creating a temporary archive in {}", parent.display()))?;
    let own_id = tmp.as_file().metadata().ok().as_ref().and_then(file_id);

    let (sha256, size_bytes, files) = write_archive(tmp.as_file(), data_dir, entries, excludes, own_id)?;
    tmp.as_file().sync_all().ctx(|| "syncing the archive".to_string())?;
    tmp.persist(out).map_err(|e| e.error).ctx(|| format!("moving the archive to {}", out.display()))?;

    Ok(ArchiveSummary { sha256, size_bytes, files })
}

/// Writes the archive to `file`; returns its checksum, its size and the number of entries.
fn write_archive(
    file: &File,
    data_dir: &Path,
    entries: &[&str],
    excludes: Vec<PathBuf>,
    own_id: Option<(u64, u64)>,
) -> Result<(String, u64, u64), ArchiveError> {
    let writer = HashingWriter::new(BufWriter::with_capacity(BUF_SIZE, file));
    let mut packer = Packer {
        builder: Builder::new(GzEncoder::new(writer, Compression::default())),
        root: data_dir,
        excludes,
        own_id,
        files: 0,
    };
    let mut seen = HashSet::new();
    for entry in entries {
        if seen.insert(*entry) {
            packer.add(Path::new(entry))?;
        }
    }
    let Packer { builder, files, .. } = packer;
    let gz = builder.into_inner().ctx(|| "finishing the tar stream".to_string())?;
    let hashing = gz.finish().ctx(|| "finishing the gzip stream".to_string())?;
    let HashingWriter { inner, hasher, written } = hashing;
    inner.into_inner().map_err(|e| e.into_error()).ctx(|| "flushing the archive".to_string())?;
    Ok((hex::encode(hasher.finalize()), written, files))
}

fn validate_entry_name(entry: &str) -> Result<(), ArchiveError> {
    let mut components = Path::new(entry).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(_)), None) if !entry.contains(['/', '\\']) => Ok(()),
        _ => Err(ArchiveError::InvalidEntry(entry.to_string())),
    }
}

struct Packer<'a, W: Write> {
    builder: Builder<W>,
    root: &'a Path,
    excludes: Vec<PathBuf>,
    own_id: Option<(u64, u64)>,
    files: u64,
}

impl<W: Write> Packer<'_, W> {
    fn add(&mut self, rel: &Path) -> Result<(), ArchiveError> {
        if self.excludes.iter().any(|ex| rel.starts_with(ex)) {
            return Ok(());
        }
        let abs = self.root.join(rel);
        let meta = match fs::symlink_metadata(&abs) {
            Ok(meta) => meta,
            // A live workspace may lose files while it is walked; that is not an error.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).ctx(|| format!("reading metadata of {}", abs.display())),
        };
        if self.own_id.is_some() && file_id(&meta) == self.own_id {
            return Ok(());
        }

        let mut header = Header::new_gnu();
        header.set_metadata_in_mode(&meta, HeaderMode::Complete);
        header.set_mode(mode_bits(&meta));
        let file_type = meta.file_type();
        if file_type.is_dir() {
            self.builder
                .append_data(&mut header, rel, io::empty())
                .ctx(|| format!("packing directory {}", abs.display()))?;
            self.files += 1;
            let mut names = fs::read_dir(&abs)
                .and_then(|dir| dir.map(|e| e.map(|e| e.file_name())).collect::<io::Result<Vec<OsString>>>())
                .ctx(|| format!("listing {}", abs.display()))?;
            names.sort();
            for name in names {
                self.add(&rel.join(name))?;
            }
        } else if file_type.is_symlink() {
            let target = fs::read_link(&abs).ctx(|| format!("reading link {}", abs.display()))?;
            self.builder.append_link(&mut header, rel, &target).ctx(|| format!("packing link {}", abs.display()))?;
            self.files += 1;
        } else if file_type.is_file() {
            let file = match File::open(&abs) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e).ctx(|| format!("opening {}", abs.display())),
            };
            // The path may have been swapped (e.g. for a link) between the lstat and the open;
            // packing what the header does not describe would be wrong, and following a new
            // link would break the never-follow rule.
            let opened = file.metadata().ctx(|| format!("reading metadata of {}", abs.display()))?;
            if !opened.is_file() || file_id(&opened) != file_id(&meta) {
                return Err(ArchiveError::Changed { path: abs });
            }
            let len = meta.len();
            let reader = ExactReader { inner: file.take(len), remaining: len };
            match self.builder.append_data(&mut header, rel, reader) {
                Ok(()) => self.files += 1,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(ArchiveError::Changed { path: abs }),
                Err(e) => return Err(e).ctx(|| format!("packing {}", abs.display())),
            }
        } else {
            tracing::debug!(path = %abs.display(), "not packing a special file");
        }
        Ok(())
    }
}

#[cfg(unix)]
fn file_id(meta: &fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn file_id(_meta: &fs::Metadata) -> Option<(u64, u64)> {
    None
}

#[cfg(unix)]
fn mode_bits(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

#[cfg(not(unix))]
fn mode_bits(meta: &fs::Metadata) -> u32 {
    if meta.is_dir() { 0o755 } else { 0o644 }
}

/// Hashes and counts what goes through it, so the archive's checksum and size come out of the
/// single write pass.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self { inner, hasher: Sha256::new(), written: 0 }
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Yields exactly the length the tar header announced: a file that grew is cut at that length,
/// one that shrank is an error (the header is already written, padding would corrupt content).
struct ExactReader<R> {
    inner: io::Take<R>,
    remaining: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while it was being packed"));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// [`unpack_with`] with the default bounds.
pub fn unpack(archive: &Path, expected_sha256: Option<&str>, dest: &Path) -> Result<ArchiveSummary, ArchiveError> {
    unpack_with(archive, expected_sha256, dest, &UnpackOptions::default())
}

/// Restores an archive made by [`pack`] (or `tar -czf`) into `dest`.
///
/// The checksum of the whole file is verified first (a blank `expected_sha256` counts as
/// absent, as "compare when provided" in the spec); on a mismatch nothing is written. The
/// archive is then extracted into a staging directory created inside `dest` (same file system,
/// so the final moves are renames — `dest` is typically a mount point whose parent is another
/// file system), and each top-level entry of the archive replaces the entry of the same name in
/// `dest` as a whole: a restore yields the snapshot's tree, not a merge with stale files.
/// Top-level entries of `dest` absent from the archive are left alone. If any step fails, the
/// entries already replaced are put back and `dest` is left as it was.
pub fn unpack_with(
    archive: &Path,
    expected_sha256: Option<&str>,
    dest: &Path,
    options: &UnpackOptions,
) -> Result<ArchiveSummary, ArchiveError> {
    let mut file = File::open(archive).ctx(|| format!("opening archive {}", archive.display()))?;
    let (actual, size_bytes) = sha256_reader(&mut file).ctx(|| format!("hashing archive {}", archive.display()))?;
    if let Some(expected) = expected_sha256.map(str::trim).filter(|e| !e.is_empty())
        && !expected.eq_ignore_ascii_case(&actual)
    {
        return Err(ArchiveError::ChecksumMismatch { expected: expected.to_ascii_lowercase(), actual });
    }
    // Extract from the handle that was hashed, so a path swapped in the meantime is not read.
    file.seek(SeekFrom::Start(0)).ctx(|| format!("rewinding archive {}", archive.display()))?;

    fs::create_dir_all(dest).ctx(|| format!("creating {}", dest.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .tempdir_in(dest)
        .ctx(|| format!("creating a staging directory in {}", dest.display()))?;
    let root = staging.path().join("root");
    fs::create_dir(&root).ctx(|| format!("creating {}", root.display()))?;

    let files = extract(BufReader::with_capacity(BUF_SIZE, file), &root, options)?;
    install(&root, dest, staging.path())?;

    if let Err(e) = staging.close() {
        tracing::warn!(error = %e, dest = %dest.display(), "could not remove the restore staging directory");
    }
    Ok(ArchiveSummary { sha256: actual, size_bytes, files })
}

/// Whether `path` is a safe relative path: `Ok(false)` when it names the root itself (`.`).
fn check_relative(path: &Path) -> Result<bool, &'static str> {
    let mut normal = false;
    for component in path.components() {
        match component {
            Component::Normal(_) => normal = true,
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` component"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(normal)
}

fn extract<R: Read>(reader: R, root: &Path, options: &UnpackOptions) -> Result<u64, ArchiveError> {
    let mut archive = Archive::new(GzDecoder::new(reader));
    archive.set_preserve_permissions(false);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);

    let mut directories = Vec::new();
    let mut total_bytes: u64 = 0;
    let mut seen: u64 = 0;
    let mut written: u64 = 0;
    for entry in archive.entries().ctx(|| "reading the archive".to_string())? {
        let mut entry = entry.ctx(|| "reading the archive".to_string())?;
        seen += 1;
        if seen > options.max_entries {
            return Err(ArchiveError::TooManyEntries { limit: options.max_entries });
        }
        let path = entry.path().ctx(|| "reading an entry path".to_string())?.into_owned();
        let shown = || path.to_string_lossy().into_owned();
        let named = check_relative(&path).map_err(|reason| ArchiveError::UnsafeEntry { path: shown(), reason })?;
        // A `./` entry (as `tar -C dir .` writes) names the destination itself.
        if !named {
            continue;
        }
        let kind = entry.header().entry_type();
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                total_bytes = total_bytes.saturating_add(entry.size());
                if total_bytes > options.max_unpacked_bytes {
                    return Err(ArchiveError::TooLarge { limit: options.max_unpacked_bytes });
                }
            }
            EntryType::Directory => {
                directories.push(entry);
                continue;
            }
            EntryType::Symlink => {}
            EntryType::Link => {
                // `unpack_in` resolves hard link targets against the destination and checks
                // them; refusing odd targets here gives a clearer error.
                let target = entry.link_name().ctx(|| format!("reading the link target of {}", shown()))?;
                match target.as_deref().map(check_relative) {
                    Some(Ok(true)) => {}
                    Some(Err(reason)) => return Err(ArchiveError::UnsafeEntry { path: shown(), reason }),
                    _ => return Err(ArchiveError::UnsafeEntry { path: shown(), reason: "hard link without a target" }),
                }
            }
            EntryType::XGlobalHeader => continue,
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                tracing::debug!(path = %shown(), "not restoring a special file");
                continue;
            }
            other => return Err(ArchiveError::UnsupportedEntry { path: shown(), kind: format!("{other:?}") }),
        }
        if !entry.unpack_in(root).map_err(flatten).ctx(|| format!("unpacking {}", shown()))? {
            return Err(ArchiveError::UnsafeEntry { path: shown(), reason: "outside the destination" });
        }
        written += 1;
    }

    // Directories last and deepest first, as `tar::Archive::unpack` does: a read-only directory
    // must get its mode only after its contents were written.
    directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut dir in directories {
        let shown = dir.path_bytes().into_owned();
        if !dir.unpack_in(root).map_err(flatten).ctx(|| format!("unpacking {}", String::from_utf8_lossy(&shown)))? {
            return Err(ArchiveError::UnsafeEntry {
                path: String::from_utf8_lossy(&shown).into_owned(),
                reason: "outside the destination",
            });
        }
        written += 1;
    }
    Ok(written)
}

/// The `tar` crate nests its reasons (`failed to unpack x` → `trying to unpack outside of
/// destination path` → …) and an `io::Error` displays only the outermost: keep them all.
fn flatten(error: io::Error) -> io::Error {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    io::Error::new(error.kind(), message)
}

enum Step {
    MovedAside(OsString),
    Installed(OsString),
}

/// Moves every top-level entry of `root` into `dest`, the previous entry of the same name into
/// `staging/previous`; on failure, undoes what was done.
fn install(root: &Path, dest: &Path, staging: &Path) -> Result<(), ArchiveError> {
    let previous = staging.join("previous");
    fs::create_dir(&previous).ctx(|| format!("creating {}", previous.display()))?;
    let mut names = fs::read_dir(root)
        .and_then(|dir| dir.map(|e| e.map(|e| e.file_name())).collect::<io::Result<Vec<OsString>>>())
        .ctx(|| format!("listing {}", root.display()))?;
    names.sort();

    let mut steps = Vec::new();
    let result = install_steps(&names, root, dest, staging, &previous, &mut steps);
    if result.is_err() {
        for step in steps.iter().rev() {
            let (from, to) = match step {
                Step::Installed(name) => (dest.join(name), root.join(name)),
                Step::MovedAside(name) => (previous.join(name), dest.join(name)),
            };
            if let Err(e) = fs::rename(&from, &to) {
                tracing::error!(error = %e, from = %from.display(), to = %to.display(), "could not roll back a restore step");
            }
        }
    }
    result
}

fn install_steps(
    names: &[OsString],
    root: &Path,
    dest: &Path,
    staging: &Path,
    previous: &Path,
    steps: &mut Vec<Step>,
) -> Result<(), ArchiveError> {
    for name in names {
        if Some(name.as_os_str()) == staging.file_name() {
            return Err(ArchiveError::UnsafeEntry {
                path: name.to_string_lossy().into_owned(),
                reason: "collides with the staging directory",
            });
        }
        let live = dest.join(name);
        let exists = match fs::symlink_metadata(&live) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e).ctx(|| format!("reading metadata of {}", live.display())),
        };
        if exists {
            fs::rename(&live, previous.join(name)).ctx(|| format!("moving {} aside", live.display()))?;
            steps.push(Step::MovedAside(name.clone()));
        }
        fs::rename(root.join(name), &live).ctx(|| format!("moving the restored {} into place", live.display()))?;
        steps.push(Step::Installed(name.clone()));
    }
    Ok(())
}

fn sha256_reader(reader: &mut impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// SHA-256 (lowercase hex) and size of a file, read in fixed-size chunks.
pub async fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total: u64 = 0;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;

    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Node {
        Dir,
        File(Vec<u8>),
        Link(PathBuf),
    }

    fn tree(root: &Path) -> BTreeMap<PathBuf, Node> {
        fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Node>) {
            let abs = root.join(rel);
            let meta = fs::symlink_metadata(&abs).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(rel.to_path_buf(), Node::Link(fs::read_link(&abs).unwrap()));
            } else if meta.is_dir() {
                if !rel.as_os_str().is_empty() {
                    out.insert(rel.to_path_buf(), Node::Dir);
                }
                for entry in fs::read_dir(&abs).unwrap() {
                    walk(root, &rel.join(entry.unwrap().file_name()), out);
                }
            } else {
                out.insert(rel.to_path_buf(), Node::File(fs::read(&abs).unwrap()));
            }
        }
        let mut out = BTreeMap::new();
        walk(root, Path::new(""), &mut out);
        out
    }

    fn write(path: &Path, content: &[u8]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    /// A data directory with nested dirs, an empty dir, a binary file, links inside and outside,
    /// the default-excluded paths, and a top-level entry that is not part of a snapshot.
    fn sample_data_dir(outside: &Path) -> tempfile::TempDir {
        let data = tempfile::tempdir().unwrap();
        let d = data.path();
        write(&d.join(".clawdbot/agents/main/sessions/sessions.json"), br#"{"s":1}"#);
        write(&d.join(".clawdbot/openclaw.json"), b"{}");
        write(&d.join(".clawdbot/logs/gateway.log"), b"log line\n");
        write(&d.join("workspace/MEMORY.md"), b"# memory\n");
        write(&d.join("workspace/memory/2024-01-01.md"), b"entry\n");
        write(&d.join("workspace/a/b/c/deep.txt"), b"deep");
        let binary: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        write(&d.join("workspace/blob.bin"), &binary);
        write(&d.join("workspace/.telegram-attachments/m1/photo-1.jpg"), b"jpeg");
        fs::create_dir_all(d.join("workspace/empty")).unwrap();
        symlink("a/b/c/deep.txt", d.join("workspace/inner-link")).unwrap();
        write(&outside.join("secret.txt"), b"outside secret");
        symlink(outside.join("secret.txt"), d.join("workspace/outside-link")).unwrap();
        symlink(outside, d.join("workspace/outside-dir-link")).unwrap();
        write(&d.join("other/not-in-snapshot.txt"), b"x");
        data
    }

    #[test]
    fn round_trip_restores_every_file_and_drops_excluded_paths() {
        let outside = tempfile::tempdir().unwrap();
        let data = sample_data_dir(outside.path());
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("snap.tar.gz");

        let packed = pack(data.path(), &SNAPSHOT_ENTRIES, &out).unwrap();
        let (sha, size) = sha256_reader(&mut File::open(&out).unwrap()).unwrap();
        assert_eq!(packed.sha256, sha);
        assert_eq!(packed.size_bytes, size);

        let dest = work.path().join("restored");
        let unpacked = unpack(&out, Some(&packed.sha256.to_uppercase()), &dest).unwrap();
        assert_eq!(unpacked.sha256, packed.sha256);
        assert_eq!(unpacked.size_bytes, packed.size_bytes);
        assert_eq!(unpacked.files, packed.files);

        let mut expected = tree(data.path());
        expected.retain(|p, _| {
            !p.starts_with("other")
                && !p.starts_with("workspace/.telegram-attachments")
                && !p.starts_with(".clawdbot/logs")
        });
        let restored = tree(&dest);
        assert_eq!(restored, expected);
        assert_eq!(packed.files, expected.len() as u64);
        assert_eq!(restored.get(Path::new("workspace/empty")), Some(&Node::Dir));
        assert_eq!(
            restored.get(Path::new("workspace/outside-link")),
            Some(&Node::Link(outside.path().join("secret.txt")))
        );
        assert!(!restored.keys().any(|p| p.starts_with("workspace/.telegram-attachments")));
        assert!(!restored.keys().any(|p| p.starts_with(".clawdbot/logs")));
        // No staging leftovers.
        let top: Vec<_> = fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(top.len(), 2, "{top:?}");
    }

    #[test]
    fn links_are_stored_not_followed() {
        let outside = tempfile::tempdir().unwrap();
        let data = sample_data_dir(outside.path());
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("snap.tar.gz");
        pack(data.path(), &SNAPSHOT_ENTRIES, &out).unwrap();

        let mut archive = Archive::new(GzDecoder::new(File::open(&out).unwrap()));
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().into_owned();
            let mut content = Vec::new();
            entry.read_to_end(&mut content).unwrap();
            assert_ne!(content, b"outside secret", "{} carries an outside file", path.display());
            if path.starts_with("workspace/outside-link") || path.starts_with("workspace/outside-dir-link") {
                assert_eq!(entry.header().entry_type(), EntryType::Symlink);
                assert_eq!(path.components().count(), 2, "nothing packed below a link: {}", path.display());
            }
        }
    }

    #[test]
    fn equal_trees_give_equal_archives() {
        let outside = tempfile::tempdir().unwrap();
        let data = sample_data_dir(outside.path());
        let work = tempfile::tempdir().unwrap();
        let first = pack(data.path(), &SNAPSHOT_ENTRIES, &work.path().join("1.tgz")).unwrap();
        let second = pack(data.path(), &SNAPSHOT_ENTRIES, &work.path().join("2.tgz")).unwrap();
        assert_eq!(first, second);
    }

    #[test]
    fn missing_entries_are_skipped_and_bad_names_refused() {
        let data = tempfile::tempdir().unwrap();
        write(&data.path().join("workspace/x.txt"), b"x");
        let work = tempfile::tempdir().unwrap();
        let summary = pack(data.path(), &SNAPSHOT_ENTRIES, &work.path().join("s.tgz")).unwrap();
        assert_eq!(summary.files, 2);

        for bad in ["../x", "a/b", "/abs", "", ".", ".."] {
            let err = pack(data.path(), &[bad], &work.path().join("bad.tgz")).unwrap_err();
            assert!(matches!(err, ArchiveError::InvalidEntry(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn custom_excludes_and_output_inside_the_tree() {
        let data = tempfile::tempdir().unwrap();
        write(&data.path().join("workspace/keep/a.txt"), b"a");
        write(&data.path().join("workspace/drop/b.txt"), b"b");
        write(&data.path().join("workspace/.telegram-attachments/c.jpg"), b"c");
        let out = data.path().join("workspace/snap.tgz");
        let options = PackOptions { exclude: vec!["./workspace/drop/".to_string()] };
        pack_with(data.path(), &["workspace"], &out, &options).unwrap();

        let dest = tempfile::tempdir().unwrap();
        unpack(&out, None, dest.path()).unwrap();
        let restored = tree(dest.path());
        assert!(restored.contains_key(Path::new("workspace/keep/a.txt")));
        assert!(!restored.contains_key(Path::new("workspace/drop")));
        // Not a default exclude any more, since the options replace the defaults.
        assert!(restored.contains_key(Path::new("workspace/.telegram-attachments/c.jpg")));
        assert!(!restored.contains_key(Path::new("workspace/snap.tgz")));
    }

    #[test]
    fn checksum_mismatch_writes_nothing() {
        let data = tempfile::tempdir().unwrap();
        write(&data.path().join("workspace/x.txt"), b"x");
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("s.tgz");
        pack(data.path(), &SNAPSHOT_ENTRIES, &out).unwrap();

        let dest = work.path().join("dest");
        let wrong = "0".repeat(64);
        let err = unpack(&out, Some(&wrong), &dest).unwrap_err();
        match &err {
            ArchiveError::ChecksumMismatch { expected, actual } => {
                assert_eq!(expected, &wrong);
                assert_eq!(actual.len(), 64);
            }
            other => panic!("unexpected error {other}"),
        }
        assert!(err.to_string().starts_with("restore checksum mismatch"));
        assert!(!dest.exists());

        let existing = tempfile::tempdir().unwrap();
        write(&existing.path().join("workspace/old.txt"), b"old");
        let before = tree(existing.path());
        unpack(&out, Some(&wrong), existing.path()).unwrap_err();
        assert_eq!(tree(existing.path()), before);
    }

    #[test]
    fn replaces_top_level_entries_and_keeps_the_others() {
        let data = tempfile::tempdir().unwrap();
        write(&data.path().join("workspace/new.txt"), b"new");
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("s.tgz");
        let packed = pack(data.path(), &SNAPSHOT_ENTRIES, &out).unwrap();

        let dest = tempfile::tempdir().unwrap();
        write(&dest.path().join("workspace/stale.txt"), b"stale");
        write(&dest.path().join(".clawdbot/openclaw.json"), b"{}");
        unpack(&out, Some(&packed.sha256), dest.path()).unwrap();
        let restored = tree(dest.path());
        assert_eq!(restored.get(Path::new("workspace/new.txt")), Some(&Node::File(b"new".to_vec())));
        assert!(!restored.contains_key(Path::new("workspace/stale.txt")));
        // The archive has no `.clawdbot`, so the live one stays.
        assert!(restored.contains_key(Path::new(".clawdbot/openclaw.json")));
        assert_eq!(fs::read_dir(dest.path()).unwrap().count(), 2);
    }

    #[test]
    fn size_bound_refuses_and_writes_nothing() {
        let data = tempfile::tempdir().unwrap();
        write(&data.path().join("workspace/big.bin"), &[7u8; 4096]);
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("s.tgz");
        pack(data.path(), &SNAPSHOT_ENTRIES, &out).unwrap();

        let dest = tempfile::tempdir().unwrap();
        write(&dest.path().join("marker"), b"m");
        let before = tree(dest.path());
        let options = UnpackOptions { max_unpacked_bytes: 4095, ..UnpackOptions::default() };
        let err = unpack_with(&out, None, dest.path(), &options).unwrap_err();
        assert!(matches!(err, ArchiveError::TooLarge { limit: 4095 }), "{err}");
        assert_eq!(tree(dest.path()), before);

        let options = UnpackOptions { max_entries: 1, ..UnpackOptions::default() };
        let err = unpack_with(&out, None, dest.path(), &options).unwrap_err();
        assert!(matches!(err, ArchiveError::TooManyEntries { limit: 1 }), "{err}");
        assert_eq!(tree(dest.path()), before);
    }

    enum Raw<'a> {
        File(&'a [u8], &'a [u8]),
        Symlink(&'a [u8], &'a [u8]),
        HardLink(&'a [u8], &'a [u8]),
    }

    /// A tar built from raw headers: `tar::Builder`'s path setters refuse what an attacker writes.
    fn malicious_archive(dir: &Path, entries: &[Raw<'_>]) -> PathBuf {
        let path = dir.join("evil.tgz");
        let mut builder = Builder::new(GzEncoder::new(File::create(&path).unwrap(), Compression::default()));
        for entry in entries {
            let mut header = Header::new_gnu();
            let (name, kind, link, data): (&[u8], EntryType, &[u8], &[u8]) = match entry {
                Raw::File(name, data) => (name, EntryType::Regular, b"", data),
                Raw::Symlink(name, target) => (name, EntryType::Symlink, target, b""),
                Raw::HardLink(name, target) => (name, EntryType::Link, target, b""),
            };
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
            gnu.linkname[..link.len()].copy_from_slice(link);
            header.set_entry_type(kind);
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap();
        path
    }

    #[test]
    fn malicious_archives_are_refused_and_write_nothing() {
        let work = tempfile::tempdir().unwrap();
        let outside = work.path().join("outside");
        write(&outside.join("secret"), b"secret");
        let outside_str = outside.to_str().unwrap().as_bytes().to_vec();
        let abs_evil = outside.join("abs-evil");
        let abs_evil_str = abs_evil.to_str().unwrap().as_bytes().to_vec();

        let cases: Vec<(&str, &str, Vec<Raw<'_>>)> = vec![
            (
                "parent dir",
                "`..` component",
                vec![Raw::File(b"workspace/ok.txt", b"ok"), Raw::File(b"../evil", b"evil")],
            ),
            ("nested parent dir", "`..` component", vec![Raw::File(b"workspace/../../evil", b"evil")]),
            (
                "absolute path",
                "absolute path",
                vec![Raw::File(b"workspace/ok.txt", b"ok"), Raw::File(&abs_evil_str, b"evil")],
            ),
            (
                "write through a symlink",
                "outside of destination",
                vec![Raw::Symlink(b"workspace/link", &outside_str), Raw::File(b"workspace/link/pwned", b"evil")],
            ),
            ("hard link outside", "`..` component", vec![Raw::HardLink(b"workspace/hl", b"../outside/secret")]),
            (
                "hard link through a symlink",
                "outside of destination",
                vec![
                    Raw::Symlink(b"workspace/link", &outside_str),
                    Raw::HardLink(b"workspace/hl", b"workspace/link/secret"),
                ],
            ),
        ];
        for (i, (name, expected_error, entries)) in cases.iter().enumerate() {
            let case_dir = work.path().join(format!("case-{i}"));
            fs::create_dir_all(&case_dir).unwrap();
            let archive = malicious_archive(&case_dir, entries);
            let dest = case_dir.join("dest");
            write(&dest.join("marker"), b"m");
            let before_outside = tree(&outside);

            let err = unpack(&archive, None, &dest).unwrap_err().to_string();
            assert!(err.contains(expected_error), "{name}: {err}");
            assert_eq!(tree(&dest), BTreeMap::from([(PathBuf::from("marker"), Node::File(b"m".to_vec()))]), "{name}");
            assert_eq!(tree(&outside), before_outside, "{name}");
            assert!(!case_dir.join("evil").exists(), "{name}");
            assert!(!work.path().join("evil").exists(), "{name}");
        }
    }

    #[tokio::test]
    async fn sha256_file_matches_a_known_vector() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        fs::write(&path, b"abc").unwrap();
        let (sha, size) = sha256_file(&path).await.unwrap();
        assert_eq!(sha, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(size, 3);

        let big = dir.path().join("big");
        let content: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        fs::write(&big, &content).unwrap();
        let (sha, size) = sha256_file(&big).await.unwrap();
        assert_eq!(sha, hex::encode(Sha256::digest(&content)));
        assert_eq!(size, 200_000);
    }
}
