//! Client-side request limits: EC2's documented token buckets, so nimbus stays within them.

use std::time::{Duration, Instant};

/// A token bucket: `capacity` requests at once, refilled at `rate` per second.
pub struct TokenBucket {
    capacity: f64,
    rate: f64,
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn new(capacity: u32, rate: f64) -> Self {
        TokenBucket {
            capacity: f64::from(capacity),
            rate,
            state: tokio::sync::Mutex::new((f64::from(capacity), Instant::now())),
        }
    }

    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut s = self.state.lock().await;
                let now = Instant::now();
                s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(self.capacity);
                s.1 = now;
                if s.0 >= 1.0 {
                    s.0 -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - s.0) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// EC2's documented request buckets (per account and region).
pub struct Limits {
    /// Non-mutating (Describe*): 100 burst, 20 per second.
    pub describe: TokenBucket,
    /// RunInstances: 5 burst, 2 per second.
    pub run_instances: TokenBucket,
    /// Other mutating actions: 200 burst, 5 per second.
    pub mutate: TokenBucket,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            describe: TokenBucket::new(100, 20.0),
            run_instances: TokenBucket::new(5, 2.0),
            mutate: TokenBucket::new(200, 5.0),
        }
    }
}
