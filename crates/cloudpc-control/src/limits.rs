//! Per-key rate limits with a hard bound on memory: sign-in attempts per client address, portal
//! actions per user. Keys come from unauthenticated callers, so the table must stay small however
//! many distinct keys arrive: entries expire, and past the cap the stalest are dropped.
//!
//! Written here rather than taken from `governor`: its keyed limiter grows with every distinct
//! key until the owner prunes it and has no cap on the number of keys, and the cap is the point.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket per key: `burst` at once, then one every `per`.
pub struct KeyedLimiter {
    burst: u32,
    per: Duration,
    max_keys: usize,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl KeyedLimiter {
    pub fn new(burst: u32, per: Duration, max_keys: usize) -> Self {
        Self { burst: burst.max(1), per, max_keys: max_keys.max(1), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token for `key`; `Err(seconds)` says how long until the next is free.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut all = self.buckets.lock().expect("limiter");
        if !all.contains_key(key) && all.len() >= self.max_keys {
            self.evict(&mut all, now);
        }
        let burst = f64::from(self.burst);
        let per = self.per.as_secs_f64().max(f64::EPSILON);
        let b = all.entry(key.to_string()).or_insert(Bucket { tokens: burst, updated: now });
        b.tokens = (b.tokens + now.duration_since(b.updated).as_secs_f64() / per).min(burst);
        b.updated = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) * per).ceil().max(1.0) as u64)
        }
    }

    /// Drops buckets that have refilled (they hold no state worth keeping); if none has, the
    /// stalest, so a flood of new keys cannot grow the table past its cap.
    fn evict(&self, all: &mut HashMap<String, Bucket>, now: Instant) {
        let full = self.per.saturating_mul(self.burst);
        all.retain(|_, b| now.duration_since(b.updated) < full);
        if all.len() >= self.max_keys {
            if let Some(oldest) = all.iter().min_by_key(|(_, b)| b.updated).map(|(k, _)| k.clone()) {
                all.remove(&oldest);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.buckets.lock().expect("limiter").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_limiter_allows_burst_then_refuses_with_wait() {
        let l = KeyedLimiter::new(3, Duration::from_secs(10), 100);
        for _ in 0..3 {
            assert!(l.check("a").is_ok());
        }
        let wait = l.check("a").unwrap_err();
        assert!((1..=10).contains(&wait), "{wait}");
        assert!(l.check("b").is_ok(), "keys are independent");
    }

    #[test]
    fn test_limiter_never_keeps_more_keys_than_its_cap() {
        let l = KeyedLimiter::new(1, Duration::from_secs(60), 50);
        for i in 0..10_000 {
            let _ = l.check(&format!("key-{i}"));
        }
        assert!(l.len() <= 50, "{}", l.len());
    }

    #[test]
    fn test_limiter_refills_over_time() {
        let l = KeyedLimiter::new(1, Duration::from_millis(20), 10);
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_err());
        std::thread::sleep(Duration::from_millis(30));
        assert!(l.check("a").is_ok());
    }
}
