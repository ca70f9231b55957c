//! Allocator settings for the server process (glibc on Linux).
//!
//! A training step allocates and frees arrays of megabytes (im2col scratch,
//! activations, gradients) every call. glibc serves blocks above its mmap
//! threshold with fresh mappings and returns the heap's free top above its
//! trim threshold to the OS, so each step paid for page faults and zeroing
//! of new pages: a quarter of a small convnet's step. Raising both lets freed
//! blocks be reused; the process keeps what it freed, up to what it used at
//! its peak (which the memory budgets bound in any case).
//! `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` in the environment
//! still win (glibc reads them; this leaves them alone when set).

/// Blocks up to this size come from the heap (reused), not their own mapping.
pub const MMAP_THRESHOLD: usize = 64 << 20;
/// Free memory at the heap's top beyond this goes back to the OS.
pub const TRIM_THRESHOLD: usize = 256 << 20;

/// Applies the settings above unless the environment sets them.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |name: &str| std::env::var_os(name).is_some();
        // SAFETY: mallopt only changes allocator parameters; called before
        // the runtime starts any other thread.
        unsafe {
            if !set("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
            }
            if !set("MALLOC_TRIM_THRESHOLD_") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
            }
        }
    }
}
