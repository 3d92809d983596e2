//! The system clock's NTP synchronisation state, as the kernel keeps it (`adjtimex`, read-only).
#![allow(unsafe_code)]

/// `Some(true)` when the kernel says the clock is synchronised, `Some(false)` when it says it is
/// not (`TIME_ERROR`), `None` where the state cannot be read.
#[cfg(target_os = "linux")]
pub fn synchronized() -> Option<bool> {
    // SAFETY: `timex` is plain old data, valid when zeroed; `modes = 0` makes adjtimex read the
    // state without changing anything, and the pointer is valid for the duration of the call.
    let state = unsafe {
        let mut tx: libc::timex = std::mem::zeroed();
        libc::adjtimex(&mut tx)
    };
    match state {
        -1 => None,
        libc::TIME_ERROR => Some(false),
        _ => Some(true),
    }
}

/// Not available off Linux.
#[cfg(not(target_os = "linux"))]
pub fn synchronized() -> Option<bool> {
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn reading_the_state_does_not_fail_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(super::synchronized().is_some());
        }
    }
}
