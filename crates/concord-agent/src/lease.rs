//! A lease held for as long as a guard lives: acquired, renewed in the
//! background, released on drop. Losing it is visible at once through
//! [`LeaseGuard::lost`] and [`LeaseGuard::is_held`]: a renewal refused, the
//! coordinator's notice that it lapsed, or — when the coordinator cannot be
//! heard, as in a network cut — the lease's ttl passing with no renewal
//! confirmed. The guard keeps that deadline itself and counts it from when
//! the confirmed request was *sent*: the coordinator counts from when it
//! received it, later, so the guard reports the loss no later than the
//! coordinator lets the lease lapse (earlier by at least the request's
//! one-way trip), never after another agent may have been granted the path.

use std::time::Duration;

use concord_proto::ResourcePath;
use concord_proto::coord::{LeaseMode, LeaseReply, LeaseRequest};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::warn;

use crate::agent::Agent;
use crate::error::AgentError;

/// Why a lease is no longer held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseLost {
    /// The coordinator let it lapse (renewals did not arrive in time).
    Expired,
    /// A renewal was refused (`code` as the lease service sent it).
    Refused {
        /// For programs: `unknown_lease`, `not_holder`, `halted`, ...
        code: String,
        /// For people.
        message: String,
    },
    /// Its ttl passed with no renewal the coordinator confirmed (renewals
    /// unanswered, as in a network cut, or not sent: a guard without
    /// renewals): the coordinator lets it lapse by then, and may grant the
    /// path to another agent, so the guard no longer counts it as held.
    Unconfirmed {
        /// Why the last renewal was not confirmed, if one was sent.
        last_error: Option<String>,
    },
}

impl LeaseLost {
    /// Whether the coordinator itself ended the lease (refused or lapsed),
    /// as opposed to the guard giving it up for want of an answer.
    fn ended_by_coordinator(&self) -> bool {
        matches!(self, LeaseLost::Expired | LeaseLost::Refused { .. })
    }
}

/// Records the first loss; a later one (say, the lapse notice after the
/// guard's own deadline) changes nothing.
fn lose(tx: &watch::Sender<Option<LeaseLost>>, why: LeaseLost) {
    tx.send_if_modified(|lost| {
        if lost.is_some() {
            return false;
        }
        *lost = Some(why);
        true
    });
}

/// The outcome of [`LeaseGuard::acquire`] when no lease was granted.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LeaseError {
    /// The lease service refused.
    #[error("lease refused: {code}: {message}")]
    Refused {
        /// For programs: `conflict`, `queue_full`, `halted`, `ttl_range`, ...
        code: String,
        /// For people.
        message: String,
        /// Who holds the conflicting lease.
        holder: Option<String>,
    },
    /// The path is taken and the request was queued (a guard holds only granted leases).
    #[error("lease queued at position {position}")]
    Queued {
        /// The lease id it will have.
        lease: u64,
        /// Its place.
        position: u32,
    },
    /// Talking to the coordinator failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// A held lease. Dropping it stops the renewals and releases the lease.
#[derive(Debug)]
pub struct LeaseGuard {
    agent: Agent,
    lease: u64,
    path: ResourcePath,
    lost: watch::Receiver<Option<LeaseLost>>,
    renew: JoinHandle<()>,
    watch: JoinHandle<()>,
    released: bool,
}

impl LeaseGuard {
    /// Acquires `path` for `ttl`, renewing every third of it.
    pub async fn acquire(
        agent: &Agent,
        path: &ResourcePath,
        mode: LeaseMode,
        ttl: Duration,
    ) -> Result<LeaseGuard, LeaseError> {
        LeaseGuard::acquire_with(agent, path, mode, ttl, true).await
    }

    /// Acquires `path` for `ttl`; renews it in the background if `renew`
    /// (without, the lease lapses after `ttl` and [`LeaseGuard::lost`] says
    /// so, as [`LeaseLost::Unconfirmed`]).
    pub async fn acquire_with(
        agent: &Agent,
        path: &ResourcePath,
        mode: LeaseMode,
        ttl: Duration,
        renew: bool,
    ) -> Result<LeaseGuard, LeaseError> {
        // Subscribe to lapse notices first: a lapse between the grant and
        // the subscription would otherwise go unseen.
        let mut notices = agent.lease_notices();
        let ttl_ms = ttl.as_millis() as u64;
        // Before the first attempt: the coordinator's ttl starts later.
        let sent = Instant::now();
        let reply = agent
            .lease(&LeaseRequest::Acquire {
                path: path.clone(),
                mode,
                ttl_ms,
                wait: false,
            })
            .await?;
        let lease = match reply {
            LeaseReply::Granted { lease, .. } => lease,
            LeaseReply::Queued { lease, position } => return Err(LeaseError::Queued { lease, position }),
            LeaseReply::Refused { code, message, holder } => return Err(LeaseError::Refused { code, message, holder }),
            LeaseReply::Released { lease } => {
                return Err(LeaseError::Refused {
                    code: "unexpected".into(),
                    message: format!("the lease service answered `released` ({lease}) to an acquire"),
                    holder: None,
                });
            }
        };
        let (tx, rx) = watch::channel(None);
        let tx2 = tx.clone();
        let watch = tokio::spawn(async move {
            loop {
                match notices.recv().await {
                    Ok(n) if n.lease == Some(lease) => {
                        lose(&tx2, LeaseLost::Expired);
                        return;
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let a = agent.clone();
        let renew = tokio::spawn(async move {
            let every = Duration::from_millis((ttl_ms / 3).max(10));
            // When the lease lapses at the latest, by what the coordinator confirmed.
            let mut deadline = sent + ttl;
            let mut last_error = None;
            loop {
                let renewal = async {
                    if !renew {
                        return std::future::pending().await;
                    }
                    tokio::time::sleep(every).await;
                    let sent = Instant::now();
                    (sent, a.lease(&LeaseRequest::Renew { lease, ttl_ms }).await)
                };
                tokio::select! {
                    // Also while a renewal is on its way: its retries may
                    // outlast the lease.
                    _ = tokio::time::sleep_until(deadline) => {
                        warn!(lease, "no renewal confirmed within the ttl: the lease counts as lost");
                        lose(&tx, LeaseLost::Unconfirmed { last_error });
                        return;
                    }
                    (sent, answer) = renewal => match answer {
                        Ok(LeaseReply::Granted { .. }) => {
                            deadline = sent + ttl;
                            last_error = None;
                        }
                        Ok(LeaseReply::Refused { code, message, .. }) => {
                            lose(&tx, LeaseLost::Refused { code, message });
                            return;
                        }
                        Ok(other) => {
                            warn!(lease, "unexpected answer to a renewal: {other:?}");
                            last_error = Some(format!("unexpected answer: {other:?}"));
                        }
                        // Not lost yet: the deadline decides.
                        Err(e) => {
                            warn!(lease, "renewal not answered: {e}");
                            last_error = Some(e.to_string());
                        }
                    },
                }
                if tx.borrow().is_some() {
                    return;
                }
            }
        });
        Ok(LeaseGuard {
            agent: agent.clone(),
            lease,
            path: path.clone(),
            lost: rx,
            renew,
            watch,
            released: false,
        })
    }

    /// The lease id.
    pub fn id(&self) -> u64 {
        self.lease
    }

    /// The path it covers (and everything under it).
    pub fn path(&self) -> &ResourcePath {
        &self.path
    }

    /// Whether it is still held, as far as the agent knows: false once a
    /// renewal was refused, the coordinator said it lapsed, or its ttl
    /// passed with no renewal confirmed.
    pub fn is_held(&self) -> bool {
        self.lost.borrow().is_none()
    }

    /// Resolves when the lease is lost.
    pub async fn lost(&mut self) -> LeaseLost {
        loop {
            if let Some(l) = self.lost.borrow_and_update().clone() {
                return l;
            }
            if self.lost.changed().await.is_err() {
                // Both tasks ended without a loss: only after release.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Releases the lease and waits for the coordinator's answer.
    pub async fn release(mut self) -> Result<(), AgentError> {
        self.released = true;
        self.renew.abort();
        self.watch.abort();
        self.agent
            .lease(&LeaseRequest::Release { lease: self.lease })
            .await
            .map(|_| ())
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.renew.abort();
        self.watch.abort();
        // A lease given up for want of an answer may still be held by the
        // coordinator: release it too.
        if self.released || self.lost.borrow().as_ref().is_some_and(LeaseLost::ended_by_coordinator) {
            return;
        }
        // Release in the background; a guard dropped outside a runtime lets
        // the lease lapse at its ttl instead.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let agent = self.agent.clone();
            let lease = self.lease;
            rt.spawn(async move {
                let _ = agent.lease(&LeaseRequest::Release { lease }).await;
            });
        }
    }
}
