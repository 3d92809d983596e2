//! App packages of tasks across nodes: what a manager serves of an app and a worker node
//! deploys. A package is an uncompressed tar of the app's deployed version directory
//! (`<data_dir>/apps/<name>/v<N>/`), built deterministically: entries in byte order of their
//! paths, directories before their contents, every mtime, uid and gid 0, no user names, modes
//! 0755 for directories and executables and 0644 for other files. Its content hash
//! (SHA-256) therefore depends only on the files' paths, bytes and executable bits, so a
//! worker node that deployed a package and packs its own copy gets the same hash, and a node
//! restarted recognises the apps it already has. Uncompressed, so that no compressor's version
//! enters the hash.
//!
//! Everything here is blocking file-system work, run on tokio's blocking pool by the driver,
//! except [`Incoming`], the task that writes a package being fetched.

use crate::apps::{AppStore, StoreError};
use anyhow::{bail, Context};
use nodus_tasks::cluster::fetch::Sha256;
use nodus_tasks::cluster::msg::{Body, MAX_CHUNK};
use nodus_tasks::cluster::AppPackage;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// Most entries (files and directories) in a package, as in a deployment.
const MAX_ENTRIES: usize = 10_000;
/// Bytes read at a time when hashing a file.
const READ_BUFFER: usize = 256 << 10;
/// Pieces of a package being fetched waiting for its writer; beyond it the fetch fails (the
/// disk falls behind the network).
pub(crate) const MAX_PENDING_PIECES: usize = 64;

/// Which deployed version of an app a package was made of: its version name and the identity
/// of its directory (a version removed and deployed again under the same name is another
/// directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Deployed {
    /// `v<N>`.
    pub(crate) version: String,
    ino: u64,
    created: Option<std::time::SystemTime>,
}

/// A package made of a deployed version.
#[derive(Debug, Clone)]
pub(crate) struct Packed {
    /// What the protocol says of it.
    pub(crate) package: AppPackage,
    /// Its archive (a manager's, to serve), open for reading.
    pub(crate) file: Option<(PathBuf, Arc<std::fs::File>)>,
}

/// What a scan found of one app.
#[derive(Debug)]
pub(crate) enum Scanned {
    /// The same version as known.
    Unchanged,
    /// Another version than known (or the first seen): its package, or why it has none.
    Changed {
        /// The version.
        deployed: Deployed,
        /// Its package.
        result: Result<Packed, String>,
    },
    /// Not deployed here (any more).
    Gone,
}

/// The current version of `app` in `store`, its directory and identity.
///
/// Fails with [`StoreError::NotDeployed`] when it is not deployed, and when its files cannot
/// be read.
pub(crate) fn deployed(store: &AppStore, app: &str) -> anyhow::Result<(PathBuf, Deployed)> {
    let (spec, version) = store.load(app)?;
    let meta = std::fs::metadata(&spec.dir).with_context(|| format!("cannot read {}", spec.dir.display()))?;
    Ok((spec.dir, Deployed { version, ino: meta.ino(), created: meta.created().ok() }))
}

/// Looks at `apps` (every deployed app when `None`) against the versions `known`, and packs
/// each that changed: into a file in `into` (a manager, which serves it), or only to learn its
/// hash (a worker node, which declares what it has).
pub(crate) fn scan(
    store: &AppStore,
    apps: Option<Vec<String>>,
    known: &BTreeMap<String, Deployed>,
    into: Option<&Path>,
    max: u64,
) -> Vec<(String, Scanned)> {
    let apps = apps.unwrap_or_else(|| store.list());
    let mut out: Vec<(String, Scanned)> = Vec::with_capacity(apps.len());
    for app in apps {
        let scanned = match deployed(store, &app) {
            Err(e) if e.downcast_ref::<StoreError>().is_some() => Scanned::Gone,
            Err(e) => {
                warn!(%app, error = %format!("{e:#}"), "cannot read the deployed app to pack it");
                Scanned::Gone
            }
            Ok((_, d)) if known.get(&app) == Some(&d) => Scanned::Unchanged,
            Ok((dir, d)) => {
                let result = match into {
                    Some(into) => build(&app, &d.version, &dir, into, max),
                    None => pack(&dir, std::io::sink(), max).map(|(hash, size)| Packed {
                        package: AppPackage { app: app.clone(), version: d.version.clone(), hash, size },
                        file: None,
                    }),
                }
                .map_err(|e| format!("cannot pack app {app} {}: {e:#}", d.version));
                Scanned::Changed { deployed: d, result }
            }
        };
        out.push((app, scanned));
    }
    for app in known.keys() {
        if !out.iter().any(|(a, _)| a == app) {
            out.push((app.clone(), Scanned::Gone));
        }
    }
    out
}

/// Packs `dir` (version `version` of `app`) into `<into>/<app>.<hash>.tar`, opened for reading.
///
/// Fails when the directory holds links or other special files, more than [`MAX_ENTRIES`]
/// entries, packs to more than `max` bytes, or cannot be read or written.
pub(crate) fn build(app: &str, version: &str, dir: &Path, into: &Path, max: u64) -> anyhow::Result<Packed> {
    std::fs::create_dir_all(into).with_context(|| format!("cannot create {}", into.display()))?;
    let building = into.join(format!(".{app}.building"));
    let packed = std::fs::File::create(&building)
        .with_context(|| format!("cannot create {}", building.display()))
        .and_then(|f| {
            let mut w = std::io::BufWriter::new(f);
            let r = pack(dir, &mut w, max)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Ok(r)
        });
    let (hash, size) = match packed {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&building);
            return Err(e);
        }
    };
    let path = into.join(format!("{app}.{hash}.tar"));
    std::fs::rename(&building, &path).with_context(|| format!("cannot write {}", path.display()))?;
    let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(Packed {
        package: AppPackage { app: app.to_string(), version: version.to_string(), hash, size },
        file: Some((path, Arc::new(file))),
    })
}

/// A writer that hashes and counts what goes through, and refuses to go past `max` bytes.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    written: u64,
    max: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written + buf.len() as u64 > self.max {
            return Err(std::io::Error::other(format!(
                "the package is larger than {} bytes (tasks.max_package_bytes)",
                self.max
            )));
        }
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// One entry of a package.
struct Entry {
    /// Relative path, `/`-separated.
    path: PathBuf,
    /// `None` for a directory; else the file's size and whether it is executable.
    file: Option<(u64, bool)>,
}

/// Lists `dir` under `rel`, depth first, in byte order.
fn walk(root: &Path, rel: &Path, out: &mut Vec<Entry>) -> anyhow::Result<()> {
    let here = root.join(rel);
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(&here)
        .with_context(|| format!("cannot read {}", here.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read {}", here.display()))?;
    names.sort();
    for name in names {
        let path = rel.join(&name);
        let full = root.join(&path);
        let meta = std::fs::symlink_metadata(&full).with_context(|| format!("cannot read {}", full.display()))?;
        if out.len() >= MAX_ENTRIES {
            bail!("{} holds more than {MAX_ENTRIES} files and directories", root.display());
        }
        if meta.is_dir() {
            out.push(Entry { path: path.clone(), file: None });
            walk(root, &path, out)?;
        } else if meta.is_file() {
            out.push(Entry { path, file: Some((meta.len(), meta.permissions().mode() & 0o111 != 0)) });
        } else {
            bail!("{} is neither a file nor a directory; packages cannot contain links", full.display());
        }
    }
    Ok(())
}

/// Writes the package of `dir` to `out`; returns its SHA-256 and size.
///
/// Fails as [`build`] does.
pub(crate) fn pack(dir: &Path, out: impl Write, max: u64) -> anyhow::Result<(String, u64)> {
    let mut entries = Vec::new();
    walk(dir, Path::new(""), &mut entries)?;
    let mut tar = tar::Builder::new(Hashing { inner: out, hash: Sha256::default(), written: 0, max });
    for e in &entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match e.file {
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                tar.append_data(&mut h, &e.path, std::io::empty())
            }
            Some((len, exec)) => {
                let full = dir.join(&e.path);
                let file = std::fs::File::open(&full).with_context(|| format!("cannot read {}", full.display()))?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(if exec { 0o755 } else { 0o644 });
                h.set_size(len);
                // A file that changed size meanwhile would make a broken archive: exactly
                // `len` bytes are taken, and a short one is an error.
                let mut body = file.take(len);
                let mut counted = Counted { inner: &mut body, n: 0 };
                let r = tar.append_data(&mut h, &e.path, &mut counted);
                if r.is_ok() && counted.n != len {
                    bail!("{} changed while it was packed", full.display());
                }
                r
            }
        }
        .with_context(|| format!("cannot pack {}", dir.join(&e.path).display()))?;
    }
    let mut w = tar.into_inner().with_context(|| format!("cannot pack {}", dir.display()))?;
    w.flush()?;
    Ok((w.hash.finish_hex(), w.written))
}

/// A reader that counts the bytes read.
struct Counted<'a, R> {
    inner: &'a mut R,
    n: u64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Checks that the file at `path` has `size` bytes whose SHA-256 is `hash`.
///
/// Fails when it cannot be read or does not match.
pub(crate) fn verify(path: &Path, hash: &str, size: u64) -> anyhow::Result<()> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::default();
    let mut buf = vec![0u8; READ_BUFFER];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    let got = h.finish_hex();
    if total != size || got != hash {
        bail!("the package written to disk has {total} bytes and SHA-256 {got}; expected {size} bytes and {hash}");
    }
    Ok(())
}

/// The answer to a `Fetch` of `package` from `offset`: its chunk, read from its file, or
/// `FetchMissing` (the offset is past the end, or the file cannot be read).
pub(crate) fn chunk(file: &std::fs::File, package: &AppPackage, offset: u64, max_len: u32) -> Body {
    let total = package.size;
    if offset > total {
        return Body::FetchMissing { reason: format!("offset {offset} is past the end ({total} bytes)") };
    }
    let len = (total - offset).min(u64::from(max_len).min(MAX_CHUNK as u64)) as usize;
    let mut data = vec![0u8; len];
    match file.read_exact_at(&mut data, offset) {
        Ok(()) => Body::FetchChunk { total, offset, data },
        Err(e) => Body::FetchMissing {
            reason: format!("the manager cannot read its package of {} {}: {e}", package.app, package.version),
        },
    }
}

/// Where a worker node writes the package of hash `hash` while it fetches it (the file name
/// ends in `.tar`, which the store's deploy unpacks).
///
/// Fails when `hash` is not 64 lower-case hex digits (it names a file).
pub(crate) fn incoming_path(dir: &Path, hash: &str) -> Result<PathBuf, String> {
    let ok = hash.len() == 64 && hash.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    if !ok {
        return Err(format!("{hash:?} is not a SHA-256 in hex"));
    }
    Ok(dir.join(format!("{hash}.tar")))
}

/// A piece of work for the writer of a package being fetched.
#[derive(Debug)]
enum Piece {
    Data(u64, Vec<u8>),
    Install,
    Drop,
}

/// A package being fetched: its bytes go, in order, to its file through a task of its own;
/// [`Incoming::install`] verifies the file, and the receiver [`Incoming::start`] gave hears
/// the outcome.
#[derive(Debug)]
pub(crate) struct Incoming {
    tx: mpsc::Sender<Piece>,
}

/// The verified file of a package, or why there is none.
pub(crate) type Verified = Result<PathBuf, String>;

impl Incoming {
    /// Starts the writer of `package` to `path`.
    pub(crate) fn start(package: &AppPackage, path: PathBuf) -> (Incoming, oneshot::Receiver<Verified>) {
        let (tx, rx) = mpsc::channel(MAX_PENDING_PIECES);
        let (done, verified) = oneshot::channel();
        tokio::spawn(write(package.hash.clone(), package.size, path, rx, done));
        (Incoming { tx }, verified)
    }

    /// Bytes at `offset`. Fails when the writer is too far behind or gone.
    pub(crate) fn data(&self, offset: u64, data: Vec<u8>) -> Result<(), String> {
        self.tx.try_send(Piece::Data(offset, data)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                format!("the disk falls behind: {MAX_PENDING_PIECES} pieces wait to be written")
            }
            mpsc::error::TrySendError::Closed(_) => "the package's writer stopped".to_string(),
        })
    }

    /// Every byte arrived: verify the file.
    pub(crate) fn install(&self) -> Result<(), String> {
        self.tx.try_send(Piece::Install).map_err(|_| "the package's writer stopped or falls behind".to_string())
    }

    /// The fetch failed: delete the file.
    pub(crate) fn drop_file(&self) {
        let _ = self.tx.try_send(Piece::Drop);
    }
}

async fn write(hash: String, size: u64, path: PathBuf, mut rx: mpsc::Receiver<Piece>, done: oneshot::Sender<Verified>) {
    let mut file: Option<tokio::fs::File> = None;
    let mut failed: Option<String> = None;
    let mut at = 0u64;
    while let Some(piece) = rx.recv().await {
        match piece {
            Piece::Data(offset, data) => {
                if failed.is_some() {
                    continue;
                }
                if offset != at {
                    failed = Some(format!("bytes at {offset} came when {at} were written"));
                    continue;
                }
                if file.is_none() {
                    match create(&path).await {
                        Ok(f) => file = Some(f),
                        Err(e) => {
                            failed = Some(format!("cannot create {}: {e}", path.display()));
                            continue;
                        }
                    }
                }
                if let Some(f) = file.as_mut() {
                    if let Err(e) = f.write_all(&data).await {
                        failed = Some(format!("cannot write {}: {e}", path.display()));
                    }
                }
                at += data.len() as u64;
            }
            Piece::Install => {
                let result = match (failed.take(), file.take()) {
                    (Some(e), _) => Err(e),
                    (None, f) => {
                        let f = match f {
                            Some(f) => Ok(f),
                            None => create(&path).await.map_err(|e| format!("cannot create {}: {e}", path.display())),
                        };
                        match f {
                            Ok(mut f) => match f.flush().await.and(f.sync_all().await) {
                                Ok(()) => {
                                    drop(f);
                                    let (p, hash) = (path.clone(), hash.clone());
                                    tokio::task::spawn_blocking(move || verify(&p, &hash, size))
                                        .await
                                        .map_err(|e| e.to_string())
                                        .and_then(|r| r.map_err(|e| format!("{e:#}")))
                                        .map(|()| path.clone())
                                }
                                Err(e) => Err(format!("cannot write {}: {e}", path.display())),
                            },
                            Err(e) => Err(e),
                        }
                    }
                };
                if result.is_err() {
                    let _ = tokio::fs::remove_file(&path).await;
                }
                let _ = done.send(result);
                return;
            }
            Piece::Drop => break,
        }
    }
    drop(file);
    let _ = tokio::fs::remove_file(&path).await;
}

async fn create(path: &Path) -> std::io::Result<tokio::fs::File> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    tokio::fs::File::create(path).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::write(root.join("manifest.json"), "{\"executable\": \"./bin/run\"}").unwrap();
        std::fs::write(root.join("bin/run"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(root.join("bin/run"), std::fs::Permissions::from_mode(0o750)).unwrap();
        std::fs::write(root.join("data.txt"), vec![b'x'; 3000]).unwrap();
    }

    #[test]
    fn the_same_files_pack_to_the_same_hash_whatever_their_times_and_order_of_creation() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        tree(&a);
        // b: the same files created in another order, another mode on a plain file, later.
        std::fs::create_dir_all(b.join("empty")).unwrap();
        std::fs::write(b.join("data.txt"), vec![b'x'; 3000]).unwrap();
        std::fs::set_permissions(b.join("data.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::create_dir_all(b.join("bin")).unwrap();
        std::fs::write(b.join("bin/run"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(b.join("bin/run"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(b.join("manifest.json"), "{\"executable\": \"./bin/run\"}").unwrap();
        let (ha, sa) = pack(&a, std::io::sink(), 1 << 20).unwrap();
        let (hb, sb) = pack(&b, std::io::sink(), 1 << 20).unwrap();
        assert_eq!((&ha, sa), (&hb, sb));
        // A byte or an executable bit more is another package.
        std::fs::write(b.join("data.txt"), vec![b'x'; 3001]).unwrap();
        assert_ne!(pack(&b, std::io::sink(), 1 << 20).unwrap().0, ha);
        std::fs::write(b.join("data.txt"), vec![b'x'; 3000]).unwrap();
        std::fs::set_permissions(b.join("data.txt"), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_ne!(pack(&b, std::io::sink(), 1 << 20).unwrap().0, ha);
    }

    #[test]
    fn a_package_deploys_through_the_store_and_packs_again_to_the_same_hash() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        tree(&src);
        let store = AppStore::new(&dir.path().join("m"), 1 << 20);
        store.deploy("app", &src, None, &Default::default()).unwrap();
        let (vdir, d) = deployed(&store, "app").unwrap();
        let built = build("app", &d.version, &vdir, &dir.path().join("packages"), 1 << 20).unwrap();
        let (path, _) = built.file.clone().unwrap();
        verify(&path, &built.package.hash, built.package.size).unwrap();
        assert!(verify(&path, &built.package.hash, built.package.size + 1).is_err());
        // On another node: the archive deployed, then packed again.
        let other = AppStore::new(&dir.path().join("w"), 1 << 20);
        other.deploy("app", &path, None, &Default::default()).unwrap();
        let known = BTreeMap::new();
        let scanned = scan(&other, None, &known, None, 1 << 20);
        let [(name, Scanned::Changed { deployed: d2, result: Ok(p) })] = &scanned[..] else { panic!("{scanned:?}") };
        assert_eq!((name.as_str(), &p.package.hash, p.package.size), ("app", &built.package.hash, built.package.size));
        assert!(other.load("app").unwrap().0.dir.join("empty").is_dir());
        // Known and unchanged: not packed again; removed: gone.
        let known = BTreeMap::from([("app".to_string(), d2.clone())]);
        assert!(matches!(&scan(&other, None, &known, None, 1 << 20)[..], [(_, Scanned::Unchanged)]));
        other.remove("app").unwrap();
        assert!(matches!(&scan(&other, None, &known, None, 1 << 20)[..], [(_, Scanned::Gone)]));
        // Chunks read back from the file are the archive.
        let file = &built.file.as_ref().unwrap().1;
        let bytes = std::fs::read(&path).unwrap();
        let Body::FetchChunk { total, offset, data } = chunk(file, &built.package, 1000, 700) else { panic!() };
        assert_eq!((total, offset, &data[..]), (bytes.len() as u64, 1000, &bytes[1000..1700]));
        let Body::FetchChunk { data, .. } = chunk(file, &built.package, total - 5, 700) else { panic!() };
        assert_eq!(data.len(), 5);
        assert!(matches!(chunk(file, &built.package, total + 1, 700), Body::FetchMissing { .. }));
    }

    #[test]
    fn links_and_too_large_apps_are_not_packed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        tree(&src);
        let e = pack(&src, std::io::sink(), 2000).unwrap_err();
        assert!(format!("{e:#}").contains("tasks.max_package_bytes"), "{e:#}");
        let e = build("app", "v1", &src, &dir.path().join("p"), 2000).unwrap_err();
        assert!(format!("{e:#}").contains("tasks.max_package_bytes"), "{e:#}");
        assert_eq!(std::fs::read_dir(dir.path().join("p")).unwrap().count(), 0, "nothing left behind");
        std::os::unix::fs::symlink("/etc/passwd", src.join("link")).unwrap();
        let e = pack(&src, std::io::sink(), 1 << 20).unwrap_err();
        assert!(format!("{e:#}").contains("cannot contain links"), "{e:#}");
        assert!(incoming_path(dir.path(), "../../etc").is_err());
        assert!(incoming_path(dir.path(), &"a".repeat(64)).unwrap().ends_with(format!("{}.tar", "a".repeat(64))));
    }
}
