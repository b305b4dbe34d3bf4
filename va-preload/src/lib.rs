//! `libva_preload.so`: loaded into the QEMU that `va run` starts on vamem's RAM file
//! (`LD_PRELOAD`), so that a guest's first touch of a page faults in that page, not a 2-4 MiB
//! window around it.
//!
//! QEMU advises `MADV_HUGEPAGE` on every RAM block it creates (`ram_block_add`). On a shared
//! file mapping that makes the mapping `VM_HUGEPAGE`, and Linux's fault path
//! (`do_sync_mmap_readahead`) then reads a 2 MiB-aligned window of up to 4 MiB around every
//! major fault, whatever the file's readahead settings. On vamem's FUSE file each such window
//! is one READ that vamem must fill from the origin before the guest continues: for a guest
//! that touches one page per MiB, every fault costs megabytes over the WAN and the trace of
//! what the guest touched is lost in the window. Measured with a stock QEMU binary (see
//! ARCHITECTURE.md, "Page-granular memory faults"): 274 MiB fetched for about 1 MiB touched
//! without this library, 22.9 MB with it.
//!
//! This library defines one symbol, `madvise`, which the dynamic linker binds before the C
//! library's: `MADV_HUGEPAGE` is accepted and ignored (a hint; QEMU goes on as if the kernel
//! had no transparent huge pages), every other advice goes to the kernel unchanged. Nothing
//! else in QEMU changes: no other symbol, no thread, no state. For memory QEMU allocates
//! itself (`memfd`, anonymous) the hint is lost too, which only matters for THP-backed guest
//! RAM, and `va run` preloads the library only when guest RAM is vamem's file.
//!
//! `VA_PRELOAD_HUGEPAGE=keep` in QEMU's environment turns the library off (for measuring).

use std::ffi::{c_int, c_long, c_void};
use std::sync::OnceLock;

/// Whether `MADV_HUGEPAGE` is dropped (`VA_PRELOAD_HUGEPAGE` is not `keep`).
fn drop_hugepage() -> bool {
    static DROP: OnceLock<bool> = OnceLock::new();
    *DROP.get_or_init(|| {
        std::env::var_os("VA_PRELOAD_HUGEPAGE").is_none_or(|v| v.as_encoded_bytes() != b"keep")
    })
}

/// `madvise(2)`, without `MADV_HUGEPAGE`.
///
/// # Safety
///
/// The caller's contract is the C library's `madvise`: `addr`/`len` name memory the process
/// may advise on. This function adds no requirement of its own.
#[no_mangle]
// SAFETY: exported under the C library's name; its contract is the C library's (see # Safety).
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    if advice == libc::MADV_HUGEPAGE && drop_hugepage() {
        return 0;
    }
    // The raw system call with the caller's arguments, exactly what the C library's madvise
    // does; on failure it returns -1 with errno set.
    // SAFETY: the kernel checks the range; the caller holds madvise's contract.
    let r: c_long = unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice as c_long) };
    r as c_int
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugepage_advice_is_ignored_and_the_rest_passes_through() {
        let len = 4 << 20;
        // SAFETY: a fresh private anonymous mapping of `len` bytes, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: advising on the mapping made above.
        unsafe {
            assert_eq!(madvise(p, len, libc::MADV_HUGEPAGE), 0);
            assert_eq!(madvise(p, len, libc::MADV_DONTNEED), 0);
            // A misaligned address is refused by the kernel, as without the library.
            assert_eq!(
                madvise(p.cast::<u8>().add(1).cast(), 4096, libc::MADV_DONTNEED),
                -1
            );
            assert_eq!(*libc::__errno_location(), libc::EINVAL);
            libc::munmap(p, len);
        }
        // The mapping is not VM_HUGEPAGE: /proc/self/smaps would say "hg" in VmFlags.
    }
}
