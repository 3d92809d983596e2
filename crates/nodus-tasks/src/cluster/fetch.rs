//! Blobs fetched in chunks over the cluster, checked against their content hash: app packages a
//! worker node lacks (from its manager) and results too large to travel inline (from the worker
//! node that holds them). Pure: the bytes go in, requests and verdicts come out; writing a
//! package to disk and deploying it is the driver's business.

use ring::digest;

use super::msg::{Blob, Body, MAX_CHUNK};

/// SHA-256 of `bytes` in lower-case hex: the content hash of packages and held results.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, bytes).as_ref())
}

/// [`sha256_hex`] of bytes that come in pieces (a package written or read as a stream).
#[derive(Clone)]
pub struct Sha256(digest::Context);

impl Default for Sha256 {
    fn default() -> Sha256 {
        Sha256(digest::Context::new(&digest::SHA256))
    }
}

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sha256")
    }
}

impl Sha256 {
    /// Adds the next piece.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The hash of every piece so far, as [`sha256_hex`] gives it.
    pub fn finish_hex(self) -> String {
        hex(self.0.finish().as_ref())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a fetch failed (the task that needed it fails with `DownloadError`, or for a result,
/// runs again).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The holder has no such blob.
    #[error("the holder has no such blob: {0}")]
    Missing(String),
    /// The blob is larger than this node accepts.
    #[error("the blob has {total} bytes; at most {max} are accepted")]
    TooLarge {
        /// Its size.
        total: u64,
        /// The bound.
        max: u64,
    },
    /// A chunk that does not continue the blob (wrong offset, the total changed, or an empty
    /// chunk before the end).
    #[error("chunk at {offset} of {total} bytes does not continue the blob at {expected}")]
    OutOfOrder {
        /// The chunk's offset.
        offset: u64,
        /// Its announced total.
        total: u64,
        /// Where the blob stands.
        expected: u64,
    },
    /// All bytes arrived but they are not the blob asked for.
    #[error("content hash {got} does not match the expected {expected}")]
    HashMismatch {
        /// The hash asked for.
        expected: String,
        /// The hash of what arrived.
        got: String,
    },
    /// The holder did not answer, or is no longer in a relationship with this node.
    #[error("the fetch failed: {0}")]
    Failed(String),
}

/// What a chunk did to a download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// More to come: send [`Download::request`].
    More,
    /// Every byte arrived and the hash matches.
    Complete,
}

/// One blob being fetched.
pub struct Download {
    blob: Blob,
    hash: String,
    max_size: u64,
    chunk: u32,
    offset: u64,
    total: Option<u64>,
    digest: digest::Context,
    /// The bytes, when the caller keeps them here (results); packages go to the driver.
    kept: Option<Vec<u8>>,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("blob", &self.blob)
            .field("offset", &self.offset)
            .field("total", &self.total)
            .finish()
    }
}

impl Download {
    /// A fetch of `blob`, whose SHA-256 must be `hash`, of at most `max_size` bytes, in chunks
    /// of `chunk` bytes (at most [`MAX_CHUNK`]). With `keep`, the bytes are kept here.
    pub fn new(blob: Blob, hash: &str, max_size: u64, chunk: u32, keep: bool) -> Download {
        Download {
            blob,
            hash: hash.to_string(),
            max_size,
            chunk: chunk.clamp(1, MAX_CHUNK as u32),
            offset: 0,
            total: None,
            digest: digest::Context::new(&digest::SHA256),
            kept: keep.then(Vec::new),
        }
    }

    /// What is fetched.
    pub fn blob(&self) -> &Blob {
        &self.blob
    }

    /// The request for the next chunk.
    pub fn request(&self) -> Body {
        Body::Fetch { blob: self.blob.clone(), offset: self.offset, max_len: self.chunk }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.offset
    }

    /// Takes a `FetchChunk`.
    ///
    /// # Errors
    /// The blob is too large, the chunk does not continue it, or (at the end) the hash does
    /// not match. The download is then over.
    pub fn feed(&mut self, total: u64, offset: u64, data: &[u8]) -> Result<Progress, FetchError> {
        if total > self.max_size {
            return Err(FetchError::TooLarge { total, max: self.max_size });
        }
        let expected = self.offset;
        let continues = offset == expected
            && self.total.is_none_or(|t| t == total)
            && offset + data.len() as u64 <= total
            && (!data.is_empty() || offset == total);
        if !continues {
            return Err(FetchError::OutOfOrder { offset, total, expected });
        }
        self.total = Some(total);
        self.digest.update(data);
        if let Some(k) = &mut self.kept {
            k.extend_from_slice(data);
        }
        self.offset += data.len() as u64;
        if self.offset < total {
            return Ok(Progress::More);
        }
        let got = hex(self.digest.clone().finish().as_ref());
        if got != self.hash {
            return Err(FetchError::HashMismatch { expected: self.hash.clone(), got });
        }
        Ok(Progress::Complete)
    }

    /// The kept bytes (after [`Progress::Complete`]).
    pub fn take_bytes(&mut self) -> Vec<u8> {
        self.kept.take().unwrap_or_default()
    }
}

/// The answer to a `Fetch` of `bytes`: the chunk from `offset`, or `FetchMissing` when the
/// offset is past the end.
pub fn chunk_of(bytes: &[u8], offset: u64, max_len: u32) -> Body {
    let total = bytes.len() as u64;
    if offset > total {
        return Body::FetchMissing { reason: format!("offset {offset} is past the end ({total} bytes)") };
    }
    let start = offset as usize;
    let end = start.saturating_add(max_len.min(MAX_CHUNK as u32) as usize).min(bytes.len());
    Body::FetchChunk { total, offset, data: bytes[start..end].to_vec() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{Lease, TaskId};

    fn blob() -> Blob {
        Blob::Result { task_id: "t".parse::<TaskId>().unwrap(), lease: Lease(1) }
    }

    fn fetch_all(bytes: &[u8], hash: &str, chunk: u32) -> Result<Vec<u8>, FetchError> {
        let mut d = Download::new(blob(), hash, 1 << 20, chunk, true);
        loop {
            let Body::Fetch { offset, max_len, .. } = d.request() else { unreachable!() };
            let Body::FetchChunk { total, offset, data } = chunk_of(bytes, offset, max_len) else { unreachable!() };
            if d.feed(total, offset, &data)? == Progress::Complete {
                return Ok(d.take_bytes());
            }
        }
    }

    #[test]
    fn known_vector() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let mut s = Sha256::default();
        s.update(b"a");
        s.update(b"");
        s.update(b"bc");
        assert_eq!(s.finish_hex(), sha256_hex(b"abc"));
    }

    #[test]
    fn chunks_assemble_and_the_hash_is_checked() {
        let bytes: Vec<u8> = (0..10_000u32).map(|n| (n % 251) as u8).collect();
        let hash = sha256_hex(&bytes);
        for chunk in [1, 7, 4096, 10_000, 1 << 20] {
            assert_eq!(fetch_all(&bytes, &hash, chunk).unwrap(), bytes, "chunk {chunk}");
        }
        assert!(matches!(fetch_all(&bytes, &sha256_hex(b"other"), 4096), Err(FetchError::HashMismatch { .. })));
        assert_eq!(fetch_all(b"", &sha256_hex(b""), 16).unwrap(), b"");
    }

    #[test]
    fn bad_chunks_end_the_download() {
        let mut d = Download::new(blob(), &sha256_hex(b"abcdef"), 100, 3, false);
        assert_eq!(d.feed(101, 0, b"abc"), Err(FetchError::TooLarge { total: 101, max: 100 }));
        let mut d = Download::new(blob(), &sha256_hex(b"abcdef"), 100, 3, false);
        assert!(matches!(d.feed(6, 3, b"def"), Err(FetchError::OutOfOrder { expected: 0, .. })));
        let mut d = Download::new(blob(), &sha256_hex(b"abcdef"), 100, 3, false);
        assert_eq!(d.feed(6, 0, b"abc"), Ok(Progress::More));
        assert!(matches!(d.feed(7, 3, b"def"), Err(FetchError::OutOfOrder { .. })), "the total changed");
        let mut d = Download::new(blob(), &sha256_hex(b"abcdef"), 100, 3, false);
        assert!(matches!(d.feed(6, 0, b""), Err(FetchError::OutOfOrder { .. })), "an empty chunk before the end");
        assert!(matches!(chunk_of(b"abc", 4, 10), Body::FetchMissing { .. }));
    }
}
