//! The durable half of the message cache: an append-only journal of the router's [`CacheOp`]s in
//! `<data_dir>/cache.journal`, made durable (`fdatasync`) before the router reports `cached`,
//! replayed at start so cached messages survive a crash (kill -9) and restarts, and compacted
//! when it grows past a few times what it holds.
//!
//! A record is `[u32 length][u32 FNV-1a checksum][body]`, big-endian; body `1, seq u64,
//! expires_at i64, perms u8, service length u8, service, message frame` for a put and `2, seq
//! u64` for a removal. Replay stops at the first torn or corrupt record (the tail of a write cut
//! by a crash), and the file is rewritten without it.
//!
//! [`CacheWriter`] runs the journal on its own thread, off the router lock and the runtime: on
//! [`Action::PersistCache`](crate::router::Action::PersistCache) the driver signals it; it takes
//! the router's journal under the lock, writes and syncs without it, then tells the router which
//! entries are durable. A failed write is retried (the reports wait); nothing is reported early.

use crate::cache::Stored;
use crate::router::{Action, CacheOp, Router};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use nodus_wire::node::Permissions;
use nodus_wire::{binary, Message};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// The journal's file name in the data directory.
pub const JOURNAL_FILE: &str = "cache.journal";
/// Largest record accepted when replaying (a message is bounded by `max_frame_bytes`).
const MAX_RECORD: usize = 1 << 30;
/// How long a failed write waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// The journal file.
#[derive(Debug)]
pub struct CacheStore {
    path: PathBuf,
    file: File,
    /// Records in the file.
    records: usize,
    /// Entries the file holds (puts not removed).
    live: usize,
}

fn checksum(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

fn encode_op(op: &CacheOp, out: &mut BytesMut) {
    let mut body = BytesMut::new();
    match op {
        CacheOp::Put(s) => {
            body.put_u8(1);
            body.put_u64(s.seq);
            body.put_i64(s.expires_at);
            body.put_u8(s.perms.bits());
            body.put_u8(s.service.len() as u8);
            body.put_slice(s.service.as_bytes());
            // A cached message fitted a frame when it arrived; the bound here is only the file's.
            let _ = binary::encode(&s.msg, &mut body, MAX_RECORD);
        }
        CacheOp::Remove(seq) => {
            body.put_u8(2);
            body.put_u64(*seq);
        }
    }
    out.put_u32(body.len() as u32);
    out.put_u32(checksum(&body));
    out.put_slice(&body);
}

fn decode_op(mut body: Bytes) -> Option<CacheOp> {
    if body.remaining() < 9 {
        return None;
    }
    let kind = body.get_u8();
    let seq = body.get_u64();
    match kind {
        2 => Some(CacheOp::Remove(seq)),
        1 => {
            if body.remaining() < 10 {
                return None;
            }
            let expires_at = body.get_i64();
            let perms = Permissions::from_bits(body.get_u8())?;
            let n = usize::from(body.get_u8());
            if body.remaining() < n + binary::HEADER_LEN {
                return None;
            }
            let service = String::from_utf8(body.split_to(n).to_vec()).ok()?;
            let len = body.get_u32() as usize;
            if body.remaining() != len {
                return None;
            }
            let msg: Message = binary::decode_body(&body).ok()?;
            Some(CacheOp::Put(Box::new(Stored { seq, service, expires_at, perms, msg })))
        }
        _ => None,
    }
}

impl CacheStore {
    /// Opens (or creates) the journal in `dir` and returns the entries it holds, oldest first.
    /// A torn or corrupt tail is dropped; the file is rewritten compacted.
    ///
    /// Fails when the file cannot be read, written or synced.
    pub fn open(dir: &Path) -> std::io::Result<(CacheStore, Vec<Stored>)> {
        let path = dir.join(JOURNAL_FILE);
        let mut data = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut data)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let entries = replay(Bytes::from(data));
        let mut store =
            CacheStore { file: OpenOptions::new().create(true).append(true).open(&path)?, path, records: 0, live: 0 };
        store.compact(&entries)?;
        Ok((store, entries))
    }

    /// Appends `ops` and syncs the file.
    ///
    /// Fails (leaving the file as it was) when the write or the sync fails.
    pub fn append(&mut self, ops: &[CacheOp]) -> std::io::Result<()> {
        let mut buf = BytesMut::new();
        for op in ops {
            encode_op(op, &mut buf);
        }
        let before = self.file.metadata()?.len();
        let written = self.file.write_all(&buf).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Never leave a torn record in the middle of the journal.
            let _ = self.file.set_len(before);
            return Err(e);
        }
        self.records += ops.len();
        for op in ops {
            match op {
                CacheOp::Put(_) => self.live += 1,
                CacheOp::Remove(_) => self.live = self.live.saturating_sub(1),
            }
        }
        Ok(())
    }

    /// True when the file holds many more records than entries: time to [`CacheStore::compact`].
    pub fn wants_compaction(&self) -> bool {
        self.records > 4 * self.live + 4096
    }

    /// Replaces the journal with `entries` (written to a temporary file, synced, renamed).
    ///
    /// Fails when the new file cannot be written, synced or renamed (the old one then stays).
    pub fn compact(&mut self, entries: &[Stored]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("journal.tmp");
        let mut buf = BytesMut::new();
        for s in entries {
            encode_op(&CacheOp::Put(Box::new(s.clone())), &mut buf);
        }
        let mut f = File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.records = entries.len();
        self.live = entries.len();
        Ok(())
    }
}

/// The entries a journal holds: puts not removed, oldest first; stops at a torn or corrupt record.
fn replay(mut data: Bytes) -> Vec<Stored> {
    let mut live: std::collections::BTreeMap<u64, Stored> = std::collections::BTreeMap::new();
    while data.remaining() >= 8 {
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let sum = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
        if len > MAX_RECORD || data.remaining() < 8 + len {
            break;
        }
        data.advance(8);
        let body = data.split_to(len);
        if checksum(&body) != sum {
            break;
        }
        match decode_op(body) {
            Some(CacheOp::Put(s)) => {
                live.insert(s.seq, *s);
            }
            Some(CacheOp::Remove(seq)) => {
                live.remove(&seq);
            }
            None => break,
        }
    }
    live.into_values().collect()
}

/// What the driver tells the writer thread.
#[derive(Debug)]
enum Signal {
    /// The router's journal has ops.
    Dirty,
    /// Write what is left, then stop.
    Finish,
}

/// The thread that makes the router's cache journal durable.
#[derive(Debug)]
pub struct CacheWriter {
    tx: mpsc::SyncSender<Signal>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl CacheWriter {
    /// Starts the thread. `with_router` runs a closure under the router lock and applies the
    /// actions it pushed (the driver's `Shared`).
    pub fn start<F>(mut store: CacheStore, with_router: F) -> CacheWriter
    where
        F: Fn(&mut dyn FnMut(&mut Router, &mut Vec<Action>)) + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel::<Signal>(1);
        let thread = std::thread::Builder::new()
            .name("nodus-cache-journal".into())
            .spawn(move || {
                let mut backlog: Vec<CacheOp> = Vec::new();
                let mut finishing = false;
                loop {
                    if !finishing {
                        match rx.recv_timeout(if backlog.is_empty() { Duration::from_secs(3600) } else { RETRY }) {
                            Ok(Signal::Dirty) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                            Ok(Signal::Finish) | Err(mpsc::RecvTimeoutError::Disconnected) => finishing = true,
                        }
                    }
                    let compact = store.wants_compaction();
                    let mut snapshot = None;
                    with_router(&mut |r, _| {
                        backlog.extend(r.take_cache_journal());
                        if compact {
                            snapshot = Some(r.cache_snapshot());
                        }
                    });
                    if !backlog.is_empty() {
                        let upto = backlog
                            .iter()
                            .filter_map(|op| match op {
                                CacheOp::Put(s) => Some(s.seq),
                                CacheOp::Remove(_) => None,
                            })
                            .max();
                        // The snapshot was taken after the journal: it includes every op taken.
                        let written = match &snapshot {
                            Some(live) => store.compact(live),
                            None => store.append(&backlog),
                        };
                        match written {
                            Ok(()) => {
                                backlog.clear();
                                if let Some(upto) = upto {
                                    with_router(&mut |r, out| r.cache_durable(upto, out));
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, file = %store.path.display(), "cannot write the cache journal; retrying");
                                if finishing {
                                    break;
                                }
                                continue;
                            }
                        }
                    }
                    if finishing {
                        break;
                    }
                }
            })
            .expect("spawn the cache journal thread");
        CacheWriter { tx, thread: std::sync::Mutex::new(Some(thread)) }
    }

    /// The router's journal has ops (on [`Action::PersistCache`]); never blocks.
    pub fn signal(&self) {
        let _ = self.tx.try_send(Signal::Dirty);
    }

    /// Writes what is left and stops the thread (blocks until it has).
    pub fn finish(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = self.tx.send(Signal::Finish);
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(seq: u64, service: &str) -> Stored {
        Stored {
            seq,
            service: service.into(),
            expires_at: 1_000 + seq as i64,
            perms: Permissions::of(&[nodus_wire::node::Permission::Send]),
            msg: Message::new("CMD").to(service).param("n", seq).with_payload(vec![seq as u8; 3]).with_id(seq),
        }
    }

    #[test]
    fn puts_and_removes_replay_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, none) = CacheStore::open(dir.path()).unwrap();
        assert!(none.is_empty());
        s.append(&[CacheOp::Put(Box::new(stored(1, "a"))), CacheOp::Put(Box::new(stored(2, "b")))]).unwrap();
        s.append(&[CacheOp::Remove(1), CacheOp::Put(Box::new(stored(3, "a")))]).unwrap();
        drop(s);
        let (_, got) = CacheStore::open(dir.path()).unwrap();
        assert_eq!(got, vec![stored(2, "b"), stored(3, "a")]);
        // Reopening compacted the file to the two live entries; they read back again.
        let (_, again) = CacheStore::open(dir.path()).unwrap();
        assert_eq!(again, got);
    }

    #[test]
    fn a_torn_tail_is_dropped_and_everything_before_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = CacheStore::open(dir.path()).unwrap();
        s.append(&[CacheOp::Put(Box::new(stored(1, "a"))), CacheOp::Put(Box::new(stored(2, "a")))]).unwrap();
        drop(s);
        let path = dir.path().join(JOURNAL_FILE);
        let full = std::fs::read(&path).unwrap();
        for cut in 1..20 {
            std::fs::write(&path, &full[..full.len() - cut]).unwrap();
            let (_, got) = CacheStore::open(dir.path()).unwrap();
            assert_eq!(got, vec![stored(1, "a")], "cut {cut} bytes");
            std::fs::write(&path, &full).unwrap();
        }
        let mut corrupt = full.clone();
        let last = corrupt.len() - 2;
        corrupt[last] ^= 0xff;
        std::fs::write(&path, &corrupt).unwrap();
        assert_eq!(CacheStore::open(dir.path()).unwrap().1, vec![stored(1, "a")]);
    }

    #[test]
    fn compaction_is_due_when_records_outnumber_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = CacheStore::open(dir.path()).unwrap();
        let mut seq = 0;
        while !s.wants_compaction() {
            seq += 1;
            s.append(&[CacheOp::Put(Box::new(stored(seq, "a"))), CacheOp::Remove(seq)]).unwrap();
        }
        s.compact(&[]).unwrap();
        assert!(!s.wants_compaction());
        assert_eq!(std::fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len(), 0);
    }
}
