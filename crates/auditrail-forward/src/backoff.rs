//! Exponential backoff with a cap: the wait after each consecutive failure doubles from
//! `initial` up to `max`, and one success resets it.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial_ms: u64,
    max_ms: u64,
    next_ms: u64,
}

impl Backoff {
    pub fn new(initial_ms: u64, max_ms: u64) -> Backoff {
        assert!(initial_ms >= 1 && initial_ms <= max_ms, "checked by the configuration");
        Backoff { initial_ms, max_ms, next_ms: initial_ms }
    }

    /// The wait before the next attempt; doubles the one after it.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next_ms;
        self.next_ms = self.next_ms.saturating_mul(2).min(self.max_ms);
        Duration::from_millis(d)
    }

    /// The wait at the cap, for a destination that keeps refusing the same items.
    pub fn at_cap(&mut self) {
        self.next_ms = self.max_ms;
    }

    pub fn reset(&mut self) {
        self.next_ms = self.initial_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(100, 500);
        let waits: Vec<u64> = (0..5).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }
}
