//! The node: starts one pinned glommio executor per shard, wires them into
//! a mesh of channels, and waits for SIGINT/SIGTERM to stop them cleanly.
//!
//! Start-up per shard: open (recover) its storage, start its log writer,
//! connect its channel ends, bind the shared port (SO_REUSEPORT, so the
//! kernel spreads connections over shards) and its own port, and report the
//! addresses. Then it accepts connections (`connection::serve`), serves
//! requests other shards forward to it, and runs retention on a timer.
//! On shutdown every shard stops accepting, flushes and syncs its log, and
//! the process exits 0.

pub mod connection;
pub mod dead_letters;
mod fetch_lists;
pub mod groups;
pub mod many;
mod read_buffer;
pub mod router;
pub mod shard_context;
pub mod socket_send;

use crate::config::Config;
use crate::metadata::MetaStore;
use coremq_shards::shard::{Shard, ShardConfig};
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use shard_context::ShardCtx;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

/// How often a shard checks whether the node is stopping.
const STOP_POLL_MS: u64 = 20;
/// How often push-delivery state is saved when it changed.
const DELIVERIES_SAVE_MS: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Metadata(#[from] crate::metadata::MetadataError),
    #[error("shard {shard}: {message}")]
    Shard { shard: usize, message: String },
    #[error("cannot start: {0}")]
    Io(#[from] std::io::Error),
}

enum Event {
    Ready {
        shard: usize,
        cpu: usize,
        own: SocketAddr,
    },
    Failed {
        shard: usize,
        message: String,
    },
    Exited,
    Signal(i32),
}

/// Runs the broker until SIGINT/SIGTERM. Prints where it listens on stdout.
pub fn run(mut config: Config) -> Result<(), ServerError> {
    std::fs::create_dir_all(&config.data_dir)?;
    // glommio resolves relative directory paths wrongly; work with absolute ones.
    config.data_dir = std::fs::canonicalize(&config.data_dir)?;
    let meta = Arc::new(MetaStore::open(&config.data_dir, config.shards)?);
    if config.pretouch_bytes > 0 {
        let (bytes, took) = crate::pretouch::pretouch(config.pretouch_bytes);
        tracing::info!(
            mib = bytes >> 20,
            ms = took.as_millis() as u64,
            "memory pre-touched (--pretouch-bytes)"
        );
    }
    let cpus: Vec<usize> = core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect())
        .filter(|ids: &Vec<usize>| !ids.is_empty())
        .unwrap_or_else(|| vec![0]);

    // Discover the shared port first when asked for any free one: a bound,
    // not listening SO_REUSEPORT socket reserves it while the shards bind.
    let mut reserve = Some(reserve_port(config.listen)?);
    let shared_addr = reserve
        .as_ref()
        .expect("just set")
        .local_addr()?
        .as_socket()
        .expect("an inet socket");
    let config = Arc::new(config);
    let stopping = Arc::new(AtomicBool::new(false));
    let ports = Arc::new(OnceLock::new());
    let (events, inbox) = mpsc::channel::<Event>();

    let mut handles = Vec::new();
    for (id, ends) in router::mesh(config.shards).into_iter().enumerate() {
        let cpu = cpus[id % cpus.len()];
        let (config, meta, stopping, ports, events) = (
            config.clone(),
            meta.clone(),
            stopping.clone(),
            ports.clone(),
            events.clone(),
        );
        let mut builder =
            LocalExecutorBuilder::new(Placement::Fixed(cpu)).name(&format!("shard-{id}"));
        if !config.spin.is_zero() {
            builder = builder.spin_before_park(config.spin);
        }
        let handle = builder.spawn(move || async move {
            let result = shard_main(
                id,
                cpu,
                ends,
                shared_addr,
                config,
                meta,
                stopping,
                ports,
                events.clone(),
            )
            .await;
            match result {
                Ok(()) => {
                    let _ = events.send(Event::Exited);
                }
                Err(message) => {
                    let _ = events.send(Event::Failed { shard: id, message });
                }
            }
        });
        handles.push(handle.map_err(|e| ServerError::Shard {
            shard: id,
            message: e.to_string(),
        })?);
    }
    drop(events);

    let mut own = vec![None; config.shards];
    let mut ready = 0;
    let mut failure = None;
    let mut exited = 0;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    let signal_handle = signals.handle();
    let (sig_tx, sig_rx) = mpsc::channel::<Event>();
    let signal_thread = std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let _ = sig_tx.send(Event::Signal(sig));
        }
    });
    loop {
        let ev = match inbox.recv_timeout(Duration::from_millis(STOP_POLL_MS)) {
            Ok(ev) => Some(ev),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let ev = ev.or_else(|| sig_rx.try_recv().ok());
        match ev {
            None => continue,
            Some(Event::Ready {
                shard,
                cpu,
                own: addr,
            }) => {
                own[shard] = Some((cpu, addr));
                ready += 1;
                if ready == config.shards {
                    // Every shard listens now; the reservation can go.
                    drop(reserve.take());
                    let list: Vec<u16> =
                        own.iter().map(|o| o.map_or(0, |(_, a)| a.port())).collect();
                    let _ = ports.set(list);
                    println!(
                        "coremq {} serving {} with {} shards",
                        env!("CARGO_PKG_VERSION"),
                        config.data_dir.display(),
                        config.shards
                    );
                    println!("listening on {shared_addr} (every shard)");
                    for (i, o) in own.iter().enumerate() {
                        if let Some((cpu, addr)) = o {
                            println!("shard {i} on cpu {cpu} listening on {addr}");
                        }
                    }
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                }
            }
            Some(Event::Failed { shard, message }) => {
                tracing::error!(shard, %message, "shard failed; stopping the node");
                failure.get_or_insert(ServerError::Shard { shard, message });
                stopping.store(true, Ordering::SeqCst);
                exited += 1;
            }
            Some(Event::Exited) => exited += 1,
            Some(Event::Signal(sig)) => {
                tracing::info!(signal = sig, "stopping: flushing every shard");
                stopping.store(true, Ordering::SeqCst);
            }
        }
        if exited == config.shards {
            break;
        }
    }
    signal_handle.close();
    let _ = signal_thread.join();
    for h in handles {
        let _ = h.join();
    }
    match failure {
        Some(f) => Err(f),
        None => {
            tracing::info!("stopped cleanly");
            Ok(())
        }
    }
}

fn reserve_port(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

#[allow(clippy::too_many_arguments)]
async fn shard_main(
    id: usize,
    cpu: usize,
    ends: router::MeshEnds,
    shared_addr: SocketAddr,
    config: Arc<Config>,
    meta: Arc<MetaStore>,
    stopping: Arc<AtomicBool>,
    ports: Arc<OnceLock<Vec<u16>>>,
    events: mpsc::Sender<Event>,
) -> Result<(), String> {
    let shard = Shard::open(ShardConfig {
        dir: config.data_dir.join(format!("shard-{id}")),
        segment_bytes: config.segment_bytes,
        flush_interval: config.flush_interval,
        flush_bytes: config.flush_bytes,
        tail_cache_bytes: config.tail_cache_bytes,
        max_message_bytes: config.max_message_bytes,
        tick_ms: config.tick.as_millis() as u64,
        retention_check_ms: config.retention_check.as_millis() as u64,
    })
    .await
    .map_err(|e| e.to_string())?;
    for d in &shard.recovery().dropped {
        tracing::warn!(
            shard = id,
            segment = %d.path.display(),
            position = d.at_pos,
            bytes = d.bytes,
            reason = %d.reason,
            "recovery dropped a damaged log tail"
        );
    }
    let writer = glommio::spawn_local(shard.writer());
    let mesh = ends.connect().await;
    let ctx = Rc::new(ShardCtx {
        id: id as u32,
        shard: shard.clone(),
        meta,
        config: config.clone(),
        peers: mesh.senders,
        shard_ports: ports,
        groups: Default::default(),
        this: Default::default(),
        fetch_lists: Default::default(),
    });
    *ctx.this.borrow_mut() = Rc::downgrade(&ctx);
    for rx in mesh.receivers {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = rx.recv().await {
                ctx.handle_peer(msg);
            }
        })
        .detach();
    }
    let shared = TcpListener::bind(shared_addr)
        .map_err(|e| format!("cannot listen on {shared_addr}: {e}"))?;
    let own_addr = if config.shard_port_base == 0 {
        SocketAddr::new(shared_addr.ip(), 0)
    } else {
        SocketAddr::new(shared_addr.ip(), config.shard_port_base + id as u16)
    };
    let own =
        TcpListener::bind(own_addr).map_err(|e| format!("cannot listen on {own_addr}: {e}"))?;
    let own_addr = own.local_addr().map_err(|e| e.to_string())?;
    let mut acceptors = Vec::new();
    for listener in [shared, own] {
        let ctx = ctx.clone();
        acceptors.push(glommio::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        glommio::spawn_local(connection::serve(ctx.clone(), stream)).detach();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }));
    }
    let _ = events.send(Event::Ready {
        shard: id,
        cpu,
        own: own_addr,
    });

    // One timer task per shard drives the shard's time wheel: delayed
    // messages, push ack timeouts and the retention period.
    let timers = {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            let mut last_save = std::time::Instant::now();
            loop {
                glommio::timer::sleep(ctx.config.tick).await;
                if last_save.elapsed() >= Duration::from_millis(DELIVERIES_SAVE_MS) {
                    last_save = std::time::Instant::now();
                    if let Err(e) = ctx.shard.save_subscriptions().await {
                        tracing::error!(error = %e, "saving push-delivery state failed");
                    }
                }
                let meta = ctx.meta.snapshot();
                let outcome = ctx.shard.tick(coremq_shards::shard::now_ms(), |key| {
                    meta.topic_by_id(key.topic_id)
                        .filter(|t| (key.queue as usize) < t.placement.len())
                        .map(crate::metadata::policy)
                });
                if outcome.retention_due {
                    run_retention(&ctx).await;
                }
            }
        })
    };
    let expiry = {
        let ctx = ctx.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_millis(groups::GROUP_EXPIRY_CHECK_MS)).await;
                ctx.expire_members();
            }
        })
    };
    while !stopping.load(Ordering::SeqCst) {
        glommio::timer::sleep(Duration::from_millis(STOP_POLL_MS)).await;
    }
    for a in acceptors {
        a.cancel().await;
    }
    expiry.cancel().await;
    timers.cancel().await;
    if let Err(e) = shard.save_subscriptions().await {
        tracing::error!(error = %e, "saving push-delivery state failed");
    }
    shard.stop().await;
    writer.await;
    tracing::info!(shard = id, "shard stopped; log flushed and synced");
    Ok(())
}

async fn run_retention(ctx: &ShardCtx) {
    let meta = ctx.meta.snapshot();
    let now_ms = coremq_shards::shard::now_ms();
    // The snapshot's id index: O(log topics) a lookup, nothing to build per run.
    let policy_of =
        |key: coremq_shards::QueueKey| meta.topic_by_id(key.topic_id).map(crate::metadata::policy);
    ctx.shard.retain_queues(|key| {
        meta.topic_by_id(key.topic_id)
            .is_some_and(|t| (key.queue as usize) < t.placement.len())
    });
    match ctx.shard.enforce_retention(now_ms, policy_of).await {
        Ok(r) if r.segments_deleted > 0 => {
            tracing::info!(
                shard = ctx.id,
                deleted = r.segments_deleted,
                log_start = r.log_start,
                "retention deleted segments"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::error!(shard = ctx.id, error = %e, "retention failed"),
    }
}
