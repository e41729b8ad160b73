//! The one retry helper: every sink, the broker publish and the replication
//! reader retry through [`run`], with exponential backoff and full jitter
//! (capped, as recommended for clients retrying against a shared service),
//! the same metrics and log lines, and a caller-supplied classification of
//! each error as [`ErrorClass::Transient`] (retried for as long as it takes,
//! alerting through the sink metrics) or [`ErrorClass::Permanent`] (given up
//! after [`Policy::permanent_attempts`], for the caller to park the batch in
//! the dead-letter topic, or retried like a transient one when the user chose
//! `on_permanent_error = "stall"`, `config::OnPermanentError`).

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use rand::Rng;

/// What an attempt's error says about the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Another attempt may well succeed (an outage, a timeout, an overloaded
    /// server): retried with backoff.
    Transient,
    /// Transient, and the server said when to come back (a `Retry-After`):
    /// that delay replaces the computed one.
    TransientAfter(Duration),
    /// The same attempt fails the same way until someone changes the data or
    /// the schema: retried [`Policy::permanent_attempts`] times in all (a
    /// misclassified blip gets its chance), then given up.
    Permanent,
    /// Not retried at all: the error is returned at once (this run lost its
    /// record to a successor, a configuration the server refuses).
    Fatal,
}

/// Which metrics a failure feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alert {
    /// `observe::sink_failed` per failure and `observe::sink_flushed` on
    /// success, labelled with [`Policy::what`]: the retry counters, the
    /// consecutive-failures gauge and the "keeps failing" error line.
    Sink,
    /// `observe::error(what)` per failure (the replication reader, which
    /// is no sink).
    Errors,
}

/// How one kind of operation is retried.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The metrics label and the `sink` field of the log lines.
    pub what: &'static str,
    /// The warn line of a failed attempt that is retried.
    pub failed: &'static str,
    pub initial: Duration,
    pub max: Duration,
    /// Attempts (failed ones, in all) after which a permanent error gives
    /// up; `None`: never, a permanent error is retried like a transient one
    /// (`on_permanent_error = "stall"`).
    pub permanent_attempts: Option<u32>,
    /// Attempts after which a transient error gives up too; `None`: never.
    /// Only the webhook has such a limit (`http.max_attempts`).
    pub transient_attempts: Option<u32>,
    /// An attempt that ran this long was healthy, so the next failure starts
    /// from the shortest delay again (long-lived sessions).
    pub healthy_after: Option<Duration>,
    pub alert: Alert,
}

impl Policy {
    /// A sink's or the broker's policy: 100 ms doubling up to 5 s, transient
    /// errors retried forever, permanent ones given up after `permanent_attempts`.
    pub fn sink(what: &'static str, permanent_attempts: Option<u32>) -> Self {
        Policy {
            what,
            failed: "write failed; retrying",
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            permanent_attempts,
            transient_attempts: None,
            healthy_after: None,
            alert: Alert::Sink,
        }
    }

    pub fn failed(mut self, line: &'static str) -> Self {
        self.failed = line;
        self
    }
}

/// Why [`run`] returned without a success.
#[derive(Debug)]
pub struct GaveUp<E> {
    pub error: E,
    /// Failed attempts, this one included.
    pub attempts: u32,
    /// The last error's class: `Permanent`, `Fatal`, or a transient one
    /// past [`Policy::transient_attempts`].
    pub class: ErrorClass,
}

impl<E> GaveUp<E> {
    /// Whether the caller may park what it was sending: everything but a
    /// fatal error, which must stop the caller.
    pub fn may_park(&self) -> bool {
        self.class != ErrorClass::Fatal
    }
}

/// Runs `op` (given the number of failed attempts so far) until it succeeds
/// or `classify` and `policy` say to give up; see [`Attempts`] for what
/// each failure emits.
pub async fn run<T, E, C, F, Fut>(policy: &Policy, classify: C, mut op: F) -> Result<T, GaveUp<E>>
where
    E: fmt::Display,
    C: Fn(&E) -> ErrorClass,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempts = Attempts::new(policy);
    loop {
        attempts.begin();
        match op(attempts.failures()).await {
            Ok(v) => {
                attempts.succeeded();
                return Ok(v);
            }
            Err(e) => {
                let class = classify(&e);
                attempts.failed(e, class).await?;
            }
        }
    }
}

/// The steps of [`run`], for a loop whose attempt needs `&mut` state a
/// closure could not lend it (the replication session, the webhook record):
/// `begin` before each attempt, then `succeeded`, or `failed`, which waits
/// out the backoff or gives up.
pub struct Attempts<'p> {
    policy: &'p Policy,
    backoff: Backoff,
    started: Instant,
}

impl<'p> Attempts<'p> {
    pub fn new(policy: &'p Policy) -> Self {
        Attempts { policy, backoff: Backoff::new(policy.initial, policy.max), started: Instant::now() }
    }

    /// Failed attempts so far.
    pub fn failures(&self) -> u32 {
        self.backoff.attempts()
    }

    pub fn begin(&mut self) {
        self.started = Instant::now();
    }

    /// Resets the consecutive-failures gauge (`Alert::Sink`), with a
    /// "recovered" line after a run of failures.
    pub fn succeeded(&mut self) {
        if self.policy.alert == Alert::Sink {
            crate::observe::sink_flushed(self.policy.what, self.backoff.attempts());
        }
    }

    /// After a failed attempt: gives the error back if `class` and the
    /// policy say to give up (reported to the metrics as a failure that is
    /// not retried, and left to the caller to log: it knows what it parks or
    /// why it stops; a fatal error is not counted at all), else logs it at
    /// warn with `sink = what`, the attempt and the delay, counts it, and
    /// waits out the backoff.
    pub async fn failed<E: fmt::Display>(&mut self, error: E, class: ErrorClass) -> Result<(), GaveUp<E>> {
        let policy = self.policy;
        let what = policy.what;
        if policy.healthy_after.is_some_and(|h| self.started.elapsed() > h) {
            self.backoff.reset();
        }
        let attempts = self.backoff.attempts() + 1;
        let limit = match class {
            ErrorClass::Fatal => Some(0),
            ErrorClass::Permanent => policy.permanent_attempts,
            ErrorClass::Transient | ErrorClass::TransientAfter(_) => policy.transient_attempts,
        };
        if limit.is_some_and(|n| attempts >= n) {
            match policy.alert {
                _ if class == ErrorClass::Fatal => {}
                Alert::Sink => crate::observe::sink_failed(what, attempts, &error, false),
                Alert::Errors => crate::observe::error(what),
            }
            return Err(GaveUp { error, attempts, class });
        }
        let delay = self.backoff.next_delay();
        let wait = match class {
            ErrorClass::TransientAfter(asked) => asked,
            _ => delay,
        };
        let permanent = class == ErrorClass::Permanent;
        tracing::warn!(sink = what, error = %error, attempt = attempts, permanent, retry_in_ms = wait.as_millis() as u64, "{}", policy.failed);
        match policy.alert {
            Alert::Sink => crate::observe::sink_failed(what, attempts, &error, true),
            Alert::Errors => crate::observe::error(what),
        }
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, attempt: 0 }
    }

    /// The delay before the next attempt: uniformly random in
    /// `[ceiling/2, ceiling]`, where the ceiling doubles each attempt up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << self.attempt.min(16));
        let ceiling = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=half)
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl fmt::Display for ErrorClass {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{self:?}")
        }
    }

    fn policy(permanent_attempts: Option<u32>) -> Policy {
        Policy {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(2),
            ..Policy::sink("test", permanent_attempts)
        }
    }

    /// Fails with the classes in `script`, then succeeds; returns the outcome and the attempts made.
    async fn attempt(policy: &Policy, script: &[ErrorClass]) -> (Result<u32, ErrorClass>, usize) {
        let calls = std::cell::Cell::new(0usize);
        let r = run(
            policy,
            |c: &ErrorClass| *c,
            |n| {
                calls.set(calls.get() + 1);
                let out = script.get(n as usize).map_or(Ok(n), |c| Err(*c));
                async move { out }
            },
        )
        .await;
        (r.map_err(|g| g.class), calls.get())
    }

    #[tokio::test]
    async fn permanent_gives_up_after_its_attempts_transient_never() {
        use ErrorClass::*;
        let p = policy(Some(3));
        assert_eq!(attempt(&p, &[Transient; 10]).await, (Ok(10), 11));
        assert_eq!(attempt(&p, &[Permanent, Transient, Permanent]).await, (Err(Permanent), 3));
        assert_eq!(attempt(&p, &[Permanent, Permanent]).await, (Ok(2), 3));
        assert_eq!(attempt(&p, &[Transient, Fatal]).await, (Err(Fatal), 2));
        // Stall: a permanent error is retried for as long as it takes.
        assert_eq!(attempt(&policy(None), &[Permanent; 6]).await, (Ok(6), 7));
        let bounded = Policy { transient_attempts: Some(4), ..policy(Some(1)) };
        assert_eq!(attempt(&bounded, &[Transient; 9]).await, (Err(Transient), 4));
    }

    #[test]
    fn grows_then_caps_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[2] >= Duration::from_millis(200) && d[2] <= Duration::from_millis(400));
        for x in &d[4..] {
            assert!(*x >= Duration::from_millis(500) && *x <= Duration::from_secs(1));
        }
        assert_eq!(b.attempts(), 8);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
