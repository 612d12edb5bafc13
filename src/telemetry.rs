//! What the operating system says about memory right now.

use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct MemorySnapshot {
    pub total: u64,
    /// Memory a new allocation can get without swapping (MemAvailable on
    /// Linux), capped by a cgroup limit when the process runs in one.
    pub available: u64,
    pub swap_total: u64,
    pub swap_free: u64,
}

impl MemorySnapshot {
    pub fn read() -> Option<MemorySnapshot> {
        let mut sys = sysinfo::System::new().ok()?;
        sys.refresh_memory();
        if sys.total_memory() == 0 {
            return None;
        }
        let mut snap = MemorySnapshot {
            total: sys.total_memory(),
            available: sys.available_memory(),
            swap_total: sys.total_swap(),
            swap_free: sys.free_swap(),
        };
        if let Some(cg) = sys.cgroup_limits() {
            snap.total = snap.total.min(cg.total_memory);
            snap.available = snap.available.min(cg.free_memory);
            snap.swap_free = snap.swap_free.min(cg.free_swap);
        }
        Some(snap)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_machine() {
        let m = super::MemorySnapshot::read().unwrap();
        assert!(m.total > 0 && m.available <= m.total);
    }
}
