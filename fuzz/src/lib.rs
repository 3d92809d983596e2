//! Shared pieces of the nodus fuzz targets: an allocation meter, the invariants every decoded
//! message must keep, and the seed corpus built from real messages.
//!
//! Each target in `fuzz_targets/` feeds untrusted bytes to one decoder and asserts that
//! decoder's own contract, not just "no panic":
//! - total: every input gives a value or an error, never a panic, an overflow or a hang;
//! - bounded: it never buffers or allocates beyond a fixed multiple of its configured maximum,
//!   whatever lengths the input announces ([`alloc::peak_during`]);
//! - in sync: after an error that is not fatal the stream goes on at the next unit, and feeding
//!   the same bytes in any chunking gives the same units;
//! - round trip: where an encoder exists, `decode(encode(m)) == m`.
#![deny(unsafe_code)]

pub mod alloc;
pub mod cluster;
pub mod seeds;
pub mod wire;

/// How many times its own maximum a decoder may hold allocated at once while decoding one unit.
///
/// Decoding expands bytes into structures (a one-byte MessagePack integer becomes a 40-byte
/// `rmpv::Value`, a three-byte text parameter a B-tree entry), so the bound is a generous
/// constant factor of the input a decoder may buffer, never of a length the input announces.
pub const AMPLIFICATION: usize = 128;

/// Allocation every decode may need regardless of its input (error texts, small tables).
pub const SLACK_BYTES: usize = 64 * 1024;

/// The most a decoder configured with `max` bytes per unit may hold allocated at once.
pub fn allocation_bound(max: usize) -> usize {
    AMPLIFICATION.saturating_mul(max).saturating_add(SLACK_BYTES)
}
