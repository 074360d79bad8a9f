//! What every AMX kernel needs before its first tile instruction: the CPU's support, the OS's
//! permission, and a tile configuration.
//!
//! Linux keeps AMX tile data disabled until the process asks for it with
//! `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`; [`int8_available`] and
//! [`bf16_available`] ask once per process. Every kernel here uses one configuration, all eight
//! tiles at 16 rows x 64 bytes ([`TileSession`]), so a thread never has to switch shapes.

/// Whether the CPU has AMX-TILE and AMX-INT8 (`tdpbssd`, `tdpbusd`) and the OS granted tile
/// data to this process.
pub fn int8_available() -> bool {
    support().int8
}

/// Whether the CPU has AMX-TILE and AMX-BF16 (`tdpbf16ps`) and the OS granted tile data to
/// this process.
pub fn bf16_available() -> bool {
    support().bf16
}

#[derive(Debug, Clone, Copy)]
struct Support {
    int8: bool,
    bf16: bool,
}

/// Asked once per process (CPUID is slow under a hypervisor, and the permission is per process).
fn support() -> Support {
    static SUPPORT: std::sync::OnceLock<Support> = std::sync::OnceLock::new();
    *SUPPORT.get_or_init(|| {
        // CPUID leaf 7 sub-leaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE, bit 25 AMX-INT8.
        let edx = cpuid_7_edx();
        let granted = edx & (1 << 24) != 0 && request_permission();
        Support { int8: granted && edx & (1 << 25) != 0, bf16: granted && edx & (1 << 22) != 0 }
    })
}

#[cfg(target_arch = "x86_64")]
fn cpuid_7_edx() -> u32 {
    std::arch::x86_64::__cpuid_count(7, 0).edx
}

#[cfg(not(target_arch = "x86_64"))]
fn cpuid_7_edx() -> u32 {
    0
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only takes two integers and changes the
    // process's permitted xsave features; it touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    rc == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_permission() -> bool {
    false
}

/// The tile configuration of every kernel: palette 1, tiles 0..8 all 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn uniform() -> Self {
        let mut cfg = [0u8; 64];
        cfg[0] = 1; // palette
        for t in 0..8 {
            cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes()); // bytes per row
            cfg[48 + t] = 16; // rows
        }
        Self(cfg)
    }
}

/// Holds this thread's tile configuration for the life of a task; releases it on drop.
pub struct TileSession(());

impl TileSession {
    /// Loads the uniform tile configuration (8 tiles of 16 rows x 64 bytes) on this thread.
    ///
    /// # Safety
    /// [`int8_available`] or [`bf16_available`] must have returned true (CPU support and OS
    /// permission).
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn start() -> Self {
        let cfg = TileConfig::uniform();
        // SAFETY: the caller guarantees AMX is usable; `cfg` is a valid 64-byte palette-1
        // configuration that lives across the instruction.
        unsafe { std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        Self(())
    }

    /// # Safety
    /// Never called on other architectures (AMX is never available there).
    #[cfg(not(target_arch = "x86_64"))]
    pub unsafe fn start() -> Self {
        unreachable!("amx kernel on a non-x86 target")
    }
}

impl Drop for TileSession {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a TileSession exists only after a successful ldtilecfg on this thread
        // (rayon tasks run to completion on one thread); tilerelease just resets tile state.
        unsafe {
            std::arch::asm!("tilerelease", options(nostack, nomem))
        };
    }
}
