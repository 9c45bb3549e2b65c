//! `nimbus reconcile`: the controller loop around [`crate::engine::reconcile::iterate`]: the interval, errors
//! backed off (bounded), signals (SIGTERM/SIGINT stop it, SIGHUP reloads the fleet file), one line per
//! iteration on stderr.

use std::sync::Arc;
use std::time::Duration;

use super::{CommandError, exit, runtime};
use crate::cli::ReconcileArgs;
use crate::config::{self, LoadedConfig};
use crate::engine::reconcile::{
    DEFAULT_INTERVAL, DEFAULT_SHUTDOWN_TIMEOUT, Iteration, MAX_BACKOFF, Policy, ReconcileError, iterate,
};

/// Below this many requests left in the forge's API budget, the loop slows down.
const LOW_BUDGET: i64 = 500;

/// The loaded fleet and what follows from it.
struct Fleet {
    loaded: LoadedConfig,
    policy: Policy,
    interval: Duration,
    shutdown_timeout: Duration,
}

impl Fleet {
    fn new(loaded: LoadedConfig, args: &ReconcileArgs) -> Fleet {
        let rc = loaded.config.reconcile.as_ref();
        Fleet {
            policy: Policy::from_config(rc),
            interval: args.interval.or(rc.and_then(|r| r.interval).map(|d| d.0)).unwrap_or(DEFAULT_INTERVAL),
            shutdown_timeout: rc.and_then(|r| r.shutdown_timeout).map(|d| d.0).unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
            loaded,
        }
    }
}

/// One line per iteration, for the operator watching it.
fn report(n: u64, it: &Iteration) {
    let mut parts = Vec::new();
    if let Some(who) = &it.locked_by {
        parts.push(format!(
            "skipped: the fleet's lock is held by {} (trying again next interval)",
            crate::util::text::terminal(who)
        ));
    }
    match it.run {
        Some(run) => parts.push(format!(
            "run {run}: {} added, {} changed, {} destroyed{}",
            it.done.add,
            it.done.change,
            it.done.destroy,
            it.status.map(|s| format!(" ({})", s.as_str().to_lowercase())).unwrap_or_default()
        )),
        None if it.locked_by.is_none() => parts.push("nothing to do".into()),
        None => {}
    }
    for d in &it.demand.pools {
        parts.push(format!(
            "pool `{}`: {} busy, {} idle, {} queued → {} machine(s){}",
            d.pool,
            d.busy,
            d.idle,
            d.queued,
            d.count,
            if d.removing.is_empty() {
                String::new()
            } else {
                format!(" (idle past their timeout: {})", d.removing.join(", "))
            }
        ));
    }
    if it.deferred > 0 {
        parts.push(format!("{} deferred", it.deferred));
    }
    if !it.pending_review.is_empty() {
        parts.push(format!(
            "{} pending review (apply them with `nimbus apply`): {}",
            it.pending_review.len(),
            crate::util::text::terminal(&it.pending_review.join("; "))
        ));
    }
    for u in &it.demand.unserved {
        parts.push(format!(
            "job {} ({}) waits since {}: {}",
            u.job,
            u.labels.join(", "),
            crate::util::time::ts(&u.queued_at),
            u.why
        ));
    }
    for e in &it.errors {
        parts.push(format!("error: {}", crate::util::text::terminal(e)));
    }
    if it.abandoned > 0 {
        parts.push(format!("{} action(s) abandoned at shutdown (marked ORPHANED)", it.abandoned));
    }
    errln!("reconcile #{n}: {}", parts.join("; "));
}

/// The webhook check of the fleet's `reconcile.webhook_secret`, if it has one.
fn webhook(
    loaded: &LoadedConfig,
    wake: &Arc<tokio::sync::Notify>,
) -> Result<Option<crate::engine::metrics::Webhook>, CommandError> {
    let Some(r) = loaded.config.reconcile.as_ref().and_then(|r| r.webhook_secret.as_ref()) else { return Ok(None) };
    let secret = crate::util::secrets::read("reconcile.webhook_secret", r, &loaded.base_dir)
        .map_err(|e| CommandError::usage(e.to_string(), "set the variable, or give a readable file"))?;
    Ok(Some(crate::engine::metrics::Webhook { secret: crate::forges::Secret::new(secret), wake: wake.clone() }))
}

pub fn reconcile(args: &ReconcileArgs) -> Result<u8, CommandError> {
    let mut fleet = Fleet::new(config::load(&args.fleet.file)?, args);
    for w in config::warnings(&fleet.loaded.config) {
        errln!("warning: {w}");
    }
    let rt = runtime();
    let _in_runtime = rt.enter();
    let stop = Arc::new(tokio::sync::watch::channel(false).0);
    let reload = Arc::new(tokio::sync::Notify::new());
    {
        let (stop, reload) = (stop.clone(), reload.clone());
        rt.spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) =
                (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
            else {
                return;
            };
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => { reload.notify_one(); continue; }
                }
                errln!("reconcile: stopping: nothing new starts; running actions finish (then the lock is freed)");
                let _ = stop.send(true);
            }
        });
    }
    let metrics = crate::engine::metrics::Metrics::new(fleet.interval);
    let wake = Arc::new(tokio::sync::Notify::new());
    metrics.set_webhook(webhook(&fleet.loaded, &wake)?);
    if let Some(addr) = args.listen {
        let listener = rt.block_on(crate::engine::metrics::bind(addr)).map_err(|source| CommandError::Io {
            what: "listen on",
            path: addr.to_string().into(),
            source,
        })?;
        let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| addr.to_string());
        errln!("reconcile: serving /metrics and /healthz on http://{bound}");
        rt.spawn(crate::engine::metrics::serve(listener, metrics.clone(), stop.subscribe()));
    }
    let mut n = 0u64;
    let mut failures = 0u32;
    loop {
        n += 1;
        let started = std::time::Instant::now();
        let outcome: Result<Iteration, CommandError> = rt.block_on(async {
            let providers =
                crate::engine::clients::build_providers(&fleet.loaded, crate::engine::clients::Purpose::Change).await?;
            let forge = crate::engine::clients::build_forge(&fleet.loaded)?;
            iterate(
                &fleet.loaded,
                args.journal.as_deref(),
                &providers,
                forge,
                &fleet.policy,
                stop.clone(),
                fleet.shutdown_timeout,
            )
            .await
            .map_err(|e: ReconcileError| CommandError::from(e))
        });
        let pause = match &outcome {
            Ok(it) => {
                metrics.iteration(it, started.elapsed());
                report(n, it);
                failures = 0;
                // The forge's API budget runs low: read it less often until it recovers.
                match it.forge_budget {
                    Some(b) if b < LOW_BUDGET => {
                        errln!("reconcile: the forge's API budget is low ({b} requests left): slowing down");
                        fleet.interval.saturating_mul(4).min(MAX_BACKOFF.max(fleet.interval))
                    }
                    _ => fleet.interval,
                }
            }
            Err(e) => {
                metrics.error(started.elapsed());
                failures += 1;
                let backoff = fleet.interval.saturating_mul(1 << failures.min(10)).min(MAX_BACKOFF).max(fleet.interval);
                errln!(
                    "reconcile #{n}: error: {}; trying again in {}",
                    crate::util::text::terminal(&e.to_string()),
                    humantime::format_duration(backoff)
                );
                backoff
            }
        };
        if args.once {
            return match outcome {
                Ok(it) if it.errors.is_empty() => Ok(exit::OK),
                Ok(_) => Ok(exit::ERROR),
                Err(e) => Err(e),
            };
        }
        if *stop.borrow() {
            errln!("reconcile: stopped");
            return Ok(exit::OK);
        }
        // Wait for the interval, a stop, or a reload. The fleet's lock is not held here.
        let reloaded = rt.block_on(async {
            let mut stopped = stop.subscribe();
            tokio::select! {
                _ = tokio::time::sleep(pause) => false,
                _ = stopped.wait_for(|s| *s) => false,
                _ = reload.notified() => true,
                _ = wake.notified() => false,
            }
        });
        if *stop.borrow() {
            errln!("reconcile: stopped");
            return Ok(exit::OK);
        }
        if reloaded {
            match config::load(&args.fleet.file) {
                Ok(l) => {
                    errln!("reconcile: reloaded `{}`", args.fleet.file.display());
                    match webhook(&l, &wake) {
                        Ok(w) => {
                            metrics.set_webhook(w);
                            fleet = Fleet::new(l, args);
                            metrics.set_interval(fleet.interval);
                        }
                        Err(e) => {
                            errln!(
                                "reconcile: the webhook secret cannot be read; keeping the fleet file loaded before:"
                            );
                            crate::cli::error::report(&e, false);
                        }
                    }
                }
                Err(e) => {
                    errln!("reconcile: the fleet file is not valid; keeping the one loaded before:");
                    crate::cli::error::report(&CommandError::from(e), false);
                }
            }
        }
    }
}
