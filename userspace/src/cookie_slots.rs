//! Attach cookies: each attached site's cookie indexes its argument spec in the kernel's
//! `SITE_SPECS` array, which has `SITES_MAX` slots. A detached site's slot is free again, so
//! `serve --on-demand` can attach and detach for as long as it runs; before slots were reused
//! it stopped attaching after `SITES_MAX` sites in all (28 on-demand cycles).

use vsrscope_common::SITES_MAX;

/// The free slots of `SITE_SPECS`.
#[derive(Debug, Clone, Default)]
pub struct CookieSlots {
    /// Slots never handed out yet are `next..SITES_MAX`.
    next: u32,
    released: Vec<u32>,
}

impl CookieSlots {
    /// A free slot, or `None` when all `SITES_MAX` are attached.
    pub fn take(&mut self) -> Option<u32> {
        if let Some(cookie) = self.released.pop() {
            return Some(cookie);
        }
        (self.next < SITES_MAX).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// Frees a slot. Call only once its site is detached: the kernel's uprobe unregistration
    /// waits for running handlers, so none reads the slot after its new spec is written.
    pub fn release(&mut self, cookie: u32) {
        debug_assert!(cookie < self.next && !self.released.contains(&cookie));
        self.released.push(cookie);
    }

    pub fn in_use(&self) -> usize {
        self.next as usize - self.released.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_slots_are_taken_again_and_never_twice_at_once() {
        let mut slots = CookieSlots::default();
        for _cycle in 0..1000 {
            let taken: Vec<u32> = (0..40).map(|_| slots.take().unwrap()).collect();
            let mut distinct = taken.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), taken.len());
            assert!(taken.iter().all(|cookie| *cookie < SITES_MAX));
            for cookie in taken {
                slots.release(cookie);
            }
            assert_eq!(slots.in_use(), 0);
        }
    }

    #[test]
    fn every_slot_is_usable_and_no_more() {
        let mut slots = CookieSlots::default();
        for _ in 0..SITES_MAX {
            assert!(slots.take().is_some());
        }
        assert_eq!(slots.take(), None);
        slots.release(7);
        assert_eq!(slots.take(), Some(7));
    }
}
