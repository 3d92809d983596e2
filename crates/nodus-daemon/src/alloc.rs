//! Giving freed memory back to the operating system. glibc's allocator keeps freed heap memory for
//! reuse, so after the node cuts a connection that held hundreds of MiB (a slow consumer's queue,
//! many partial frames) the process would keep that RSS; `malloc_trim` returns the free pages.
//! Elsewhere (musl, other systems) this does nothing.
#![allow(unsafe_code)]

/// Returns free heap pages to the operating system. Takes the allocator's locks for a moment: call
/// it rarely, off the runtime (the driver does, after large releases).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() {
    // SAFETY: malloc_trim has no preconditions: it only releases free memory the allocator owns,
    // under the allocator's own locks, and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Nothing to do off glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}

#[cfg(test)]
mod tests {
    #[test]
    fn trimming_with_nothing_to_give_back_is_harmless() {
        let v = vec![1u8; 1 << 20];
        drop(v);
        super::trim();
        super::trim();
    }
}
