//! Component identities: a non-zero 64-bit number, written in decimal like the wire's `_id` and
//! `_pid`, so the same component reads the same in an envelope, a tag and a parameter.

use std::fmt;
use std::str::FromStr;

/// The identity of one component. Zero is never a component: on the wire it means "none"
/// (`pid :: Hash | null`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComponentId(u64);

/// Why a text is not a component id (the text, shortened when long).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid component id {0:?}: use a non-zero decimal number below 2^64")]
pub struct BadComponentId(pub String);

impl ComponentId {
    /// The id `raw`, or `None` for zero ("no component").
    pub fn new(raw: u64) -> Option<Self> {
        (raw != 0).then_some(ComponentId(raw))
    }

    /// The number on the wire.
    pub fn get(self) -> u64 {
        self.0
    }

    /// A stable id derived from names (for example `["node-a", "service", "billing"]`): the same
    /// names give the same id on every node and across restarts (64-bit FNV-1a over the parts,
    /// each followed by a zero byte; a zero hash becomes 1).
    pub fn derive(parts: &[&str]) -> Self {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h = OFFSET;
        for part in parts {
            for b in part.bytes().chain(std::iter::once(0)) {
                h ^= u64::from(b);
                h = h.wrapping_mul(PRIME);
            }
        }
        ComponentId(h.max(1))
    }

    /// The wire value of an optional id: zero for `None`.
    pub fn raw(id: Option<ComponentId>) -> u64 {
        id.map_or(0, ComponentId::get)
    }
}

impl fmt::Display for ComponentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for ComponentId {
    type Err = BadComponentId;

    /// Parses a decimal id; fails on zero, signs, spaces and anything but digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadComponentId(crate::control::clip(s));
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse::<u64>().ok().and_then(ComponentId::new).ok_or_else(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_no_component() {
        assert_eq!(ComponentId::new(0), None);
        assert_eq!(ComponentId::raw(None), 0);
        assert!("0".parse::<ComponentId>().is_err());
    }

    #[test]
    fn text_round_trip_and_strictness() {
        let id = ComponentId::new(u64::MAX).unwrap();
        assert_eq!(id.to_string().parse::<ComponentId>(), Ok(id));
        for bad in ["", "-1", "+1", " 1", "1 ", "0x10", "18446744073709551616", "12a"] {
            assert!(bad.parse::<ComponentId>().is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn derived_ids_are_stable_and_tell_parts_apart() {
        let a = ComponentId::derive(&["node-a", "service", "billing"]);
        assert_eq!(a, ComponentId::derive(&["node-a", "service", "billing"]));
        // The separator keeps "ab"+"c" apart from "a"+"bc".
        assert_ne!(ComponentId::derive(&["ab", "c"]), ComponentId::derive(&["a", "bc"]));
        // Known FNV-1a value of a single zero byte, so the hash never changes between versions.
        assert_eq!(ComponentId::derive(&[""]).get(), 0xaf63_bd4c_8601_b7df);
    }
}
