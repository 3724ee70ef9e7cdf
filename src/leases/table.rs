//! The lease table: who holds each profile, who waits for it, and what must
//! happen next.
//!
//! The table is a plain state machine. It performs no I/O and reads no
//! clock: every method takes the current time, and every consequence is
//! queued as an [`Effect`] for the driver to carry out (a storage write, an
//! answer to a load, an event for a connection). The driver reports storage
//! outcomes back through [`LeaseTable::grant_done`] and
//! [`LeaseTable::release_done`], and a holder's own release before it is
//! written ([`LeaseTable::releasing`], which may hand the profile over in
//! the same write) and once it is durable ([`LeaseTable::released`]). That
//! keeps the rules of DESIGN.md section 3 in one place, testable without
//! sockets, disks or sleeps.
//!
//! The table decides who should hold a profile; storage enforces it. Every
//! grant writes a new epoch, and storage refuses writes under any other, so
//! even a wrong decision here could not let two sessions write one profile.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use profiled_protocol::{LoadPolicy, LossReason, SessionId};
use tokio::time::Instant;

use crate::ProfileKey;
use crate::storage::{Granted, WriteError};

/// The daemon's id for a client connection.
pub type ConnId = u64;

/// A load, as the table sees it.
#[derive(Clone, Debug)]
pub struct LoadRequest {
    /// The connection asking; its session becomes the owner.
    pub conn: ConnId,
    /// The request id to answer.
    pub request_id: u64,
    /// The profile.
    pub key: ProfileKey,
    /// What to do if it is held.
    pub policy: LoadPolicy,
    /// When to give up waiting, if ever.
    pub deadline: Option<Instant>,
}

/// Why a load did not grant a lease.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// This session already holds or is loading the profile.
    #[error("{0} is already loaded by this session")]
    AlreadyLoaded(ProfileKey),
    /// Another session holds it and the policy was `Cancel`.
    #[error("{key} is held by {owner}")]
    Taken {
        /// The profile.
        key: ProfileKey,
        /// Its holder.
        owner: SessionId,
    },
    /// A newer ForceLoad or Steal of the same profile replaced this one.
    #[error("a newer force load of {0} replaced this one")]
    Superseded(ProfileKey),
    /// The caller's deadline passed.
    #[error("timed out waiting for {0}")]
    Timeout(ProfileKey),
    /// The daemon is stopping.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The session already holds (or is being granted) the most leases
    /// one session may (`limits.max_leases_per_session`).
    #[error("{key} was not granted: this session already holds {limit} leases, the most allowed")]
    TooManyLeases {
        /// The profile.
        key: ProfileKey,
        /// The limit.
        limit: usize,
    },
    /// Storage failed to record the grant.
    #[error("{0}")]
    Storage(WriteError),
}

/// Something the table needs done.
#[derive(Debug)]
pub enum Effect {
    /// Durably grant `owner` the lease, then call
    /// [`LeaseTable::grant_done`] with `ticket`.
    Grant {
        /// The profile.
        key: ProfileKey,
        /// Identifies this grant when its outcome comes back.
        ticket: u64,
        /// The new holder.
        owner: SessionId,
    },
    /// Durably end a lease whose holder is gone, then call
    /// [`LeaseTable::release_done`].
    Release {
        /// The profile.
        key: ProfileKey,
        /// The holder.
        owner: SessionId,
        /// The lease's epoch.
        epoch: u64,
    },
    /// Answer a load.
    Answer {
        /// The connection that asked.
        conn: ConnId,
        /// The request to answer.
        request_id: u64,
        /// The outcome.
        result: Result<Granted, LoadError>,
    },
    /// Close a connection whose session was taken over by a newer one.
    Kick {
        /// The older connection.
        conn: ConnId,
    },
    /// A lease was taken from its holder by another load. Only counted;
    /// the holder is told through [`Effect::Push`].
    Taken {
        /// Why it was taken.
        reason: LossReason,
    },
    /// Tell a connection something it did not ask about.
    Push {
        /// The connection.
        conn: ConnId,
        /// What to tell it.
        event: LeaseEvent,
    },
}

/// A grant to write together with a holder's release; see
/// [`LeaseTable::releasing`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandOver {
    /// Identifies the grant when its outcome comes back to
    /// [`LeaseTable::grant_done`].
    pub ticket: u64,
    /// The next holder.
    pub next: SessionId,
}

/// Events for lease holders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseEvent {
    /// Another session force-loads `key`.
    ReleaseRequested {
        /// The profile.
        key: ProfileKey,
        /// The holder's epoch.
        epoch: u64,
        /// Who asks.
        requester: SessionId,
    },
    /// The lease was taken.
    LeaseLost {
        /// The profile.
        key: ProfileKey,
        /// The epoch that ended.
        epoch: u64,
        /// Why.
        reason: LossReason,
        /// The new holder.
        new_owner: Option<SessionId>,
    },
    /// The daemon stops taking loads and releases every lease in
    /// `deadline_ms`.
    ShuttingDown {
        /// Milliseconds until the daemon releases the remaining leases.
        deadline_ms: u64,
    },
}

/// The rules a table enforces, from the `[leases]` and `[session]` config.
#[derive(Clone, Copy, Debug)]
pub struct LeaseRules {
    /// How long a ForceLoad waits for a connected holder after asking it.
    pub force_load_timeout: Duration,
    /// How long a disconnected session keeps its leases for a resume.
    pub resume_grace: Duration,
    /// Whether a ForceLoad takes a disconnected holder's lease at once
    /// instead of when its resume grace runs out.
    pub take_disconnected_at_once: bool,
    /// The most leases one session may hold, counting grants being
    /// written. It bounds the `Welcome` that lists them on a reconnect.
    pub max_leases_per_session: usize,
}

/// What a connecting session learns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connected {
    /// The leases the session holds, resumed with their epochs.
    pub leases: Vec<(ProfileKey, u64)>,
}

/// A session as listed for operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSummary {
    /// The session.
    pub session: SessionId,
    /// Its connection, `None` while it is away.
    pub conn: Option<ConnId>,
    /// Its leases and their epochs.
    pub leases: Vec<(ProfileKey, u64)>,
}

/// The lease table.
#[derive(Debug)]
pub struct LeaseTable {
    rules: LeaseRules,
    /// Only profiles with a holder or a waiter have an entry.
    keys: HashMap<ProfileKey, KeyState>,
    /// Live connections and the loads each waits for, so a disconnect can
    /// cancel them without scanning every profile.
    conns: HashMap<ConnId, Conn>,
    /// Sessions that are connected or still hold leases. A session outlives
    /// its connection for the resume grace.
    sessions: HashMap<SessionId, Session>,
    /// Pending deadlines. A timer whose subject has already gone simply
    /// finds nothing when it fires.
    timers: BTreeMap<(Instant, u64), Timer>,
    /// Source of tickets, waiter ids, generations and timer tie-breakers.
    next_id: u64,
    /// Set once the daemon stops taking loads.
    stopping: bool,
    /// Effects not yet collected by the driver.
    effects: Vec<Effect>,
}

#[derive(Debug)]
struct Conn {
    session: SessionId,
    waiting: HashSet<ProfileKey>,
}

#[derive(Debug)]
struct Session {
    /// The session's connection; `None` while it is away.
    conn: Option<ConnId>,
    held: HashSet<ProfileKey>,
    /// Profiles being granted to the session, counted with `held`
    /// against [`LeaseRules::max_leases_per_session`].
    granting: HashSet<ProfileKey>,
    /// Changes at every connect and disconnect, so an expiry timer armed
    /// for an earlier absence does nothing.
    generation: u64,
}

#[derive(Debug, Default)]
struct KeyState {
    holder: Holder,
    /// Waiting loads. ForceLoads and Steals go ahead of Repeats; only the
    /// head is ever considered.
    queue: VecDeque<Waiter>,
    /// While a ForceLoad heads the queue: when the holder, already asked to
    /// release, loses the lease anyway.
    force_deadline: Option<Instant>,
}

#[derive(Debug, Default)]
enum Holder {
    #[default]
    Free,
    /// A grant is being written. Boxed because it is the largest state and
    /// the briefest: unboxed, every held profile's entry would be its size.
    Granting(Box<Granting>),
    Held(Held),
    /// The daemon is writing the release of a lease whose holder left.
    Releasing {
        session: SessionId,
    },
}

#[derive(Debug)]
struct Granting {
    ticket: u64,
    waiter: Waiter,
    /// The holder before this grant, until its lease is known to be over.
    previous: Option<Previous>,
}

/// The holder a grant follows.
#[derive(Debug)]
enum Previous {
    /// The grant takes the lease; the holder is told why once it is
    /// durable.
    Taken(Held, LossReason),
    /// The holder is releasing the lease, and the grant is written with
    /// that release so both share a sync. It becomes `None` when the
    /// release is durable; a grant that fails while it is still here means
    /// the release failed too: the holder keeps the lease, and the load
    /// goes back to waiting, with the ForceLoad deadline it had.
    Releasing {
        held: Held,
        force_deadline: Option<Instant>,
    },
}

#[derive(Clone, Debug)]
struct Held {
    session: SessionId,
    epoch: u64,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    conn: ConnId,
    session: SessionId,
    request_id: u64,
    policy: LoadPolicy,
    /// The caller's deadline, kept to re-arm it if the waiter returns to
    /// the queue after a failed hand-over.
    deadline: Option<Instant>,
}

#[derive(Debug)]
enum Timer {
    /// A waiter's own deadline.
    Deadline { key: ProfileKey, waiter: u64 },
    /// A ForceLoad's patience with the holder.
    Force { key: ProfileKey },
    /// The end of a disconnected session's resume grace.
    Expire { session: SessionId, generation: u64 },
}

impl LeaseTable {
    /// An empty table.
    pub fn new(rules: LeaseRules) -> Self {
        Self {
            rules,
            keys: HashMap::new(),
            conns: HashMap::new(),
            sessions: HashMap::new(),
            timers: BTreeMap::new(),
            next_id: 0,
            stopping: false,
            effects: Vec::new(),
        }
    }

    /// Takes the effects queued so far, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Adopts leases found in storage at start. Their sessions count as
    /// disconnected, with a full resume grace from `now`.
    pub fn recover(&mut self, leases: Vec<(ProfileKey, SessionId, u64)>, now: Instant) {
        for (key, session, epoch) in leases {
            self.sessions
                .entry(session.clone())
                .or_insert_with(|| Session {
                    conn: None,
                    held: HashSet::new(),
                    granting: HashSet::new(),
                    generation: 0,
                })
                .held
                .insert(key.clone());
            self.keys.entry(key).or_default().holder = Holder::Held(Held { session, epoch });
        }
        let sessions: Vec<SessionId> = self.sessions.keys().cloned().collect();
        for session in sessions {
            self.start_grace(&session, now);
        }
    }

    /// Registers a connection for `session`, resuming the leases it holds.
    /// If the session is connected elsewhere, the newer connection takes
    /// over and the older one is kicked.
    pub fn connect(&mut self, conn: ConnId, session: SessionId, now: Instant) -> Connected {
        let session_id = session.clone();
        self.next_id += 1;
        let generation = self.next_id;
        let entry = self
            .sessions
            .entry(session.clone())
            .or_insert_with(|| Session {
                conn: None,
                held: HashSet::new(),
                granting: HashSet::new(),
                generation,
            });
        entry.generation = generation;
        let replaced = entry.conn.replace(conn);
        let held: Vec<ProfileKey> = entry.held.iter().cloned().collect();
        self.conns.insert(
            conn,
            Conn {
                session,
                waiting: HashSet::new(),
            },
        );
        if let Some(old) = replaced {
            self.drop_conn(old, now);
            self.effects.push(Effect::Kick { conn: old });
        }
        let mut leases = Vec::with_capacity(held.len());
        let mut unlisted = Vec::new();
        for key in held {
            if let Some(KeyState {
                holder: Holder::Held(h),
                ..
            }) = self.keys.get(&key)
            {
                leases.push((key.clone(), h.epoch));
            } else {
                unlisted.push(key.clone());
            }
            // A ForceLoad that waited for the session to come back can now
            // ask it to release.
            self.pump(&key, now);
        }
        // A lease being released or handed over is not in the welcome, so
        // the client takes it as gone. Should that release fail, the lease
        // is then released by the daemon rather than handed back to a
        // client that has let it go (see `reinstate`).
        if let Some(entry) = self.sessions.get_mut(&session_id) {
            for key in &unlisted {
                entry.held.remove(key);
            }
        }
        Connected { leases }
    }

    /// Forgets a connection: its waits are cancelled. Its session keeps its
    /// leases for the resume grace, or releases them at once while the
    /// daemon is stopping.
    pub fn disconnect(&mut self, conn: ConnId, now: Instant) {
        let Some(session) = self.drop_conn(conn, now) else {
            return;
        };
        let Some(entry) = self.sessions.get_mut(&session) else {
            return;
        };
        if entry.conn != Some(conn) {
            // A newer connection has taken the session over.
            return;
        }
        entry.conn = None;
        if self.stopping || self.rules.resume_grace.is_zero() {
            self.release_session(&session);
        } else {
            self.start_grace(&session, now);
        }
    }

    /// Handles a load.
    pub fn load(&mut self, request: LoadRequest, now: Instant) {
        let Some(conn) = self.conns.get_mut(&request.conn) else {
            return;
        };
        let session = conn.session.clone();
        let key = request.key;
        let answer = |result| Effect::Answer {
            conn: request.conn,
            request_id: request.request_id,
            result,
        };
        if self.stopping {
            self.effects.push(answer(Err(LoadError::ShuttingDown)));
            return;
        }
        let state = self.keys.entry(key.clone()).or_default();
        if state.involves(&session) {
            self.effects
                .push(answer(Err(LoadError::AlreadyLoaded(key))));
            return;
        }
        if request.policy == LoadPolicy::Cancel
            && let Some(owner) = state.owner()
        {
            let owner = owner.clone();
            self.effects
                .push(answer(Err(LoadError::Taken { key, owner })));
            return;
        }
        self.next_id += 1;
        let waiter = Waiter {
            id: self.next_id,
            conn: request.conn,
            session,
            request_id: request.request_id,
            policy: request.policy,
            deadline: request.deadline,
        };
        if matches!(request.policy, LoadPolicy::ForceLoad | LoadPolicy::Steal) {
            // The newest demand wins: older ForceLoads of this key give way.
            let mut superseded = Vec::new();
            state.queue.retain(|w| {
                let old = w.policy == LoadPolicy::ForceLoad;
                if old {
                    superseded.push((w.conn, w.request_id));
                }
                !old
            });
            for (old_conn, request_id) in superseded {
                if let Some(c) = self.conns.get_mut(&old_conn) {
                    c.waiting.remove(&key);
                }
                self.effects.push(Effect::Answer {
                    conn: old_conn,
                    request_id,
                    result: Err(LoadError::Superseded(key.clone())),
                });
            }
        }
        let waiter_id = waiter.id;
        match request.policy {
            LoadPolicy::Steal => state.queue.push_front(waiter),
            LoadPolicy::ForceLoad => {
                let at = state
                    .queue
                    .iter()
                    .position(|w| w.policy != LoadPolicy::Steal)
                    .unwrap_or(state.queue.len());
                state.queue.insert(at, waiter);
            }
            LoadPolicy::Repeat | LoadPolicy::Cancel => state.queue.push_back(waiter),
        }
        if let Some(conn) = self.conns.get_mut(&request.conn) {
            conn.waiting.insert(key.clone());
        }
        if let Some(deadline) = request.deadline {
            self.arm(
                deadline,
                Timer::Deadline {
                    key: key.clone(),
                    waiter: waiter_id,
                },
            );
        }
        self.pump(&key, now);
    }

    /// Records that a holder is about to release `key` under `epoch`. If a
    /// load waits for the profile, its grant starts now and is returned
    /// rather than queued as an [`Effect::Grant`]: the driver writes it in
    /// one step with the release, so a handoff waits for one sync rather
    /// than two, and storage refuses the grant if the release fails. The
    /// release's outcome still comes through [`LeaseTable::released`], the
    /// grant's through [`LeaseTable::grant_done`].
    ///
    /// Only the holder's own release under its current epoch counts: any
    /// other would fail in storage, and must not take a waiter off the
    /// queue.
    pub fn releasing(
        &mut self,
        key: &ProfileKey,
        owner: &SessionId,
        epoch: u64,
    ) -> Option<HandOver> {
        let state = self.keys.get(key)?;
        if !matches!(&state.holder, Holder::Held(held) if held.epoch == epoch && held.session == *owner)
        {
            return None;
        }
        self.refuse_sessions_at_their_limit(key);
        let state = self.keys.get_mut(key)?;
        let Holder::Held(held) = &state.holder else {
            return None;
        };
        if state.queue.is_empty() {
            return None;
        }
        let previous = Previous::Releasing {
            held: held.clone(),
            force_deadline: state.force_deadline,
        };
        let (ticket, next) = self.begin_grant(key, Some(previous))?;
        Some(HandOver { ticket, next })
    }

    /// Records that a holder's own release of `key` under `epoch` is durable.
    pub fn released(&mut self, key: &ProfileKey, epoch: u64, now: Instant) {
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        match &mut state.holder {
            Holder::Held(held) if held.epoch == epoch => {
                let session = held.session.clone();
                state.holder = Holder::Free;
                state.force_deadline = None;
                self.forget_lease(&session, key);
                self.pump(key, now);
            }
            Holder::Granting(granting)
                if granting
                    .previous
                    .as_ref()
                    .is_some_and(|previous| previous.held().epoch == epoch) =>
            {
                if let Some(previous) = granting.previous.take() {
                    self.forget_lease(&previous.held().session, key);
                }
            }
            _ => {}
        }
    }

    /// Records the outcome of an [`Effect::Grant`].
    pub fn grant_done(
        &mut self,
        key: &ProfileKey,
        ticket: u64,
        result: Result<Granted, WriteError>,
        now: Instant,
    ) {
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        let Holder::Granting(granting) = &state.holder else {
            return;
        };
        if granting.ticket != ticket {
            return;
        }
        let Holder::Granting(granting) = std::mem::take(&mut state.holder) else {
            return;
        };
        let Granting {
            waiter, previous, ..
        } = *granting;
        if let Some(entry) = self.sessions.get_mut(&waiter.session) {
            entry.granting.remove(key);
        }
        match result {
            Ok(granted) => {
                let epoch = granted.lease.epoch;
                let usable = !self.stopping && self.conns.contains_key(&waiter.conn);
                if usable {
                    state.holder = Holder::Held(Held {
                        session: waiter.session.clone(),
                        epoch,
                    });
                } else {
                    // Nobody can use the lease: the loader left, or the
                    // daemon is stopping. Give it straight back.
                    state.holder = Holder::Releasing {
                        session: waiter.session.clone(),
                    };
                }
                // A holder that was releasing has released: storage only
                // grants behind a release that happened.
                if let Some(Previous::Releasing { held, .. }) = previous {
                    self.forget_lease(&held.session, key);
                } else if let Some(Previous::Taken(previous, reason)) = previous {
                    self.effects.push(Effect::Taken { reason });
                    if let Some(conn) = self.conn_of(&previous.session) {
                        self.effects.push(Effect::Push {
                            conn,
                            event: LeaseEvent::LeaseLost {
                                key: key.clone(),
                                epoch: previous.epoch,
                                reason,
                                new_owner: Some(waiter.session.clone()),
                            },
                        });
                    }
                    self.forget_lease(&previous.session, key);
                }
                if usable {
                    if let Some(entry) = self.sessions.get_mut(&waiter.session) {
                        entry.held.insert(key.clone());
                    }
                    self.effects.push(Effect::Answer {
                        conn: waiter.conn,
                        request_id: waiter.request_id,
                        result: Ok(granted),
                    });
                } else {
                    self.effects.push(Effect::Answer {
                        conn: waiter.conn,
                        request_id: waiter.request_id,
                        result: Err(LoadError::ShuttingDown),
                    });
                    self.effects.push(Effect::Release {
                        key: key.clone(),
                        owner: waiter.session,
                        epoch,
                    });
                }
            }
            // Nothing was written, so whoever held the lease still does.
            Err(err) => match previous {
                // The holder's release failed, and the grant with it:
                // nothing changed, so the load waits on.
                Some(Previous::Releasing {
                    held,
                    force_deadline,
                }) => {
                    self.reinstate(key, held);
                    self.requeue(key, waiter, force_deadline);
                }
                Some(Previous::Taken(held, _)) => {
                    self.effects.push(Effect::Answer {
                        conn: waiter.conn,
                        request_id: waiter.request_id,
                        result: Err(LoadError::Storage(err)),
                    });
                    self.reinstate(key, held);
                }
                None => {
                    self.effects.push(Effect::Answer {
                        conn: waiter.conn,
                        request_id: waiter.request_id,
                        result: Err(LoadError::Storage(err)),
                    });
                    state.holder = Holder::Free;
                }
            },
        }
        self.pump(key, now);
    }

    /// Records that an [`Effect::Release`] finished. On failure the stored
    /// lease may linger, which is harmless: the next grant replaces it.
    pub fn release_done(&mut self, key: &ProfileKey, now: Instant) {
        if let Some(state) = self.keys.get_mut(key)
            && matches!(state.holder, Holder::Releasing { .. })
        {
            state.holder = Holder::Free;
            self.pump(key, now);
        }
    }

    /// Records that storage ended the lease `epoch` on `key` by an admin's
    /// action: the holder is told it lost the lease for `reason`, and the
    /// next waiter moves up. A lease that has already changed hands is left
    /// alone.
    pub fn revoked(&mut self, key: &ProfileKey, epoch: u64, reason: LossReason, now: Instant) {
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        let lost = match &mut state.holder {
            Holder::Held(held) if held.epoch == epoch => {
                let held = held.clone();
                state.holder = Holder::Free;
                state.force_deadline = None;
                Some(held)
            }
            // The grant under way took the lease from this holder; it no
            // longer needs telling once that grant is durable.
            Holder::Granting(granting)
                if granting
                    .previous
                    .as_ref()
                    .is_some_and(|previous| previous.held().epoch == epoch) =>
            {
                granting.previous.take().map(Previous::into_held)
            }
            _ => None,
        };
        if let Some(held) = lost {
            if let Some(conn) = self.conn_of(&held.session) {
                self.effects.push(Effect::Push {
                    conn,
                    event: LeaseEvent::LeaseLost {
                        key: key.clone(),
                        epoch,
                        reason,
                        new_owner: None,
                    },
                });
            }
            self.forget_lease(&held.session, key);
        }
        self.pump(key, now);
    }

    /// Asks the holder of `key` to release it on behalf of `requester`, as
    /// a ForceLoad would but without queueing. Returns the holder and its
    /// epoch, if the profile is held.
    pub fn ask_release(
        &mut self,
        key: &ProfileKey,
        requester: SessionId,
    ) -> Option<(SessionId, u64)> {
        let (session, epoch) = self.holder(key)?;
        let (session, epoch) = (session.clone(), epoch);
        if let Some(conn) = self.conn_of(&session) {
            self.effects.push(Effect::Push {
                conn,
                event: LeaseEvent::ReleaseRequested {
                    key: key.clone(),
                    epoch,
                    requester,
                },
            });
        }
        Some((session, epoch))
    }

    /// The session holding `key` and its epoch, if it is held.
    pub fn holder(&self, key: &ProfileKey) -> Option<(&SessionId, u64)> {
        match &self.keys.get(key)?.holder {
            Holder::Held(held) => Some((&held.session, held.epoch)),
            _ => None,
        }
    }

    /// The connection of the session holding `key` under `epoch`, if that
    /// lease is still held and its session is connected.
    pub fn holder_conn(&self, key: &ProfileKey, session: &SessionId, epoch: u64) -> Option<ConnId> {
        match self.holder(key) {
            Some((holder, held)) if holder == session && held == epoch => self.conn_of(session),
            _ => None,
        }
    }

    /// Every session, its connection if it is connected, and the leases it
    /// holds, sorted by session.
    pub fn sessions(&self) -> Vec<SessionSummary> {
        let mut out: Vec<_> = self
            .sessions
            .iter()
            .map(|(id, session)| {
                let mut leases: Vec<(ProfileKey, u64)> = session
                    .held
                    .iter()
                    .filter_map(|key| {
                        // The held sets and the holders agree (the model
                        // test checks it at every step); asking for the
                        // holder as well keeps this listing true even if a
                        // later change let them drift.
                        let (holder, epoch) = self.holder(key)?;
                        (holder == id).then(|| (key.clone(), epoch))
                    })
                    .collect();
                leases.sort();
                SessionSummary {
                    session: id.clone(),
                    conn: session.conn,
                    leases,
                }
            })
            .collect();
        out.sort_by(|a, b| a.session.cmp(&b.session));
        out
    }

    /// Whether `session` is connected or holds leases.
    pub fn knows(&self, session: &SessionId) -> bool {
        self.sessions.contains_key(session)
    }

    /// How many sessions are connected or hold leases.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The earliest pending deadline.
    pub fn next_timer(&self) -> Option<Instant> {
        self.timers.keys().next().map(|(at, _)| *at)
    }

    /// Acts on every deadline at or before `now`.
    pub fn fire_timers(&mut self, now: Instant) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            match entry.remove() {
                Timer::Deadline { key, waiter } => self.expire_waiter(&key, waiter, now),
                Timer::Force { key } => self.pump(&key, now),
                Timer::Expire {
                    session,
                    generation,
                } => {
                    let away = self
                        .sessions
                        .get(&session)
                        .is_some_and(|s| s.conn.is_none() && s.generation == generation);
                    if away {
                        self.release_session(&session);
                    }
                }
            }
        }
    }

    /// Stops taking loads: every waiting and later load ends with
    /// `ShuttingDown`. Leases stay held.
    pub fn stop_loads(&mut self) {
        self.stopping = true;
        for (key, state) in &mut self.keys {
            for waiter in state.queue.drain(..) {
                if let Some(c) = self.conns.get_mut(&waiter.conn) {
                    c.waiting.remove(key);
                }
                self.effects.push(Effect::Answer {
                    conn: waiter.conn,
                    request_id: waiter.request_id,
                    result: Err(LoadError::ShuttingDown),
                });
            }
            state.force_deadline = None;
        }
        self.timers
            .retain(|_, timer| matches!(timer, Timer::Expire { .. }));
    }

    /// Tells every connection that the daemon stops in `deadline`.
    pub fn announce_shutdown(&mut self, deadline: Duration) {
        let deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
        for &conn in self.conns.keys() {
            self.effects.push(Effect::Push {
                conn,
                event: LeaseEvent::ShuttingDown { deadline_ms },
            });
        }
    }

    /// Releases every held lease, keeping the last saved data. Returns how
    /// many releases were started.
    pub fn release_all(&mut self) -> usize {
        let first = self.effects.len();
        let sessions: Vec<SessionId> = self.sessions.keys().cloned().collect();
        let started = sessions
            .iter()
            .map(|session| self.release_session(session))
            .sum();
        // In key order, storage finds each next record near the last one,
        // which makes a shutdown with many leases markedly faster than the
        // hash order the sessions hold them in.
        if let Some(releases) = self.effects.get_mut(first..) {
            // Only releases are pushed here; any other effect would sort
            // first, keeping its order.
            releases.sort_by(|a, b| released_key(a).cmp(&released_key(b)));
        }
        started
    }

    /// Whether no lease is held, granted or being released.
    pub fn is_idle(&self) -> bool {
        self.keys
            .values()
            .all(|state| matches!(state.holder, Holder::Free))
    }

    /// How many leases are held.
    pub fn held(&self) -> usize {
        self.keys
            .values()
            .filter(|state| matches!(state.holder, Holder::Held(_)))
            .count()
    }

    /// How many loads are waiting.
    pub fn queued(&self) -> usize {
        self.keys.values().map(|state| state.queue.len()).sum()
    }

    /// Moves `key` forward: grants a free profile to the head of its queue,
    /// lets a Steal take it, asks the holder on behalf of a ForceLoad, or
    /// takes it once the ForceLoad's patience is spent.
    fn pump(&mut self, key: &ProfileKey, now: Instant) {
        self.refuse_sessions_at_their_limit(key);
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        let head = state.queue.front().map(|w| w.policy);
        if head != Some(LoadPolicy::ForceLoad) {
            state.force_deadline = None;
        }
        match (&state.holder, head) {
            (Holder::Free, Some(_)) => self.start_grant(key, None),
            (Holder::Held(held), Some(LoadPolicy::Steal)) => {
                let previous = Previous::Taken(held.clone(), LossReason::Stolen);
                self.start_grant(key, Some(previous));
            }
            (Holder::Held(held), Some(LoadPolicy::ForceLoad)) => {
                let holder_conn = self
                    .sessions
                    .get(&held.session)
                    .and_then(|session| session.conn);
                match (holder_conn, state.force_deadline) {
                    // Nobody can answer a release request; the lease frees
                    // when the holder's resume grace runs out, unless the
                    // rules say to take it now.
                    (None, _) => {
                        if self.rules.take_disconnected_at_once {
                            let previous =
                                Previous::Taken(held.clone(), LossReason::ForceLoadTimeout);
                            self.start_grant(key, Some(previous));
                        }
                    }
                    (Some(conn), None) => {
                        let deadline = now + self.rules.force_load_timeout;
                        state.force_deadline = Some(deadline);
                        let requester = state
                            .queue
                            .front()
                            .map(|w| w.session.clone())
                            .unwrap_or_else(|| held.session.clone());
                        self.effects.push(Effect::Push {
                            conn,
                            event: LeaseEvent::ReleaseRequested {
                                key: key.clone(),
                                epoch: held.epoch,
                                requester,
                            },
                        });
                        self.arm(deadline, Timer::Force { key: key.clone() });
                    }
                    (Some(_), Some(deadline)) if now >= deadline => {
                        let previous = Previous::Taken(held.clone(), LossReason::ForceLoadTimeout);
                        self.start_grant(key, Some(previous));
                    }
                    (Some(_), Some(_)) => {}
                }
            }
            (Holder::Free, None) => {
                self.keys.remove(key);
            }
            _ => {}
        }
    }

    /// Answers, from the head of `key`'s queue, each load whose session
    /// already holds or is being granted
    /// [`LeaseRules::max_leases_per_session`] leases, so that the next
    /// grant (or the decision to take the profile from its holder) is for
    /// a load that may have it. A refused ForceLoad takes its deadline
    /// with it: the holder was asked for the profile on its behalf.
    fn refuse_sessions_at_their_limit(&mut self, key: &ProfileKey) {
        let limit = self.rules.max_leases_per_session;
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        while let Some(head) = state.queue.front() {
            let full = self
                .sessions
                .get(&head.session)
                .is_some_and(|entry| entry.held.len() + entry.granting.len() >= limit);
            if !full {
                break;
            }
            let Some(waiter) = state.queue.pop_front() else {
                break;
            };
            if state.queue.front().map(|w| w.policy) != Some(LoadPolicy::ForceLoad) {
                state.force_deadline = None;
            }
            if let Some(c) = self.conns.get_mut(&waiter.conn) {
                c.waiting.remove(key);
            }
            self.effects.push(Effect::Answer {
                conn: waiter.conn,
                request_id: waiter.request_id,
                result: Err(LoadError::TooManyLeases {
                    key: key.clone(),
                    limit,
                }),
            });
        }
    }

    /// Pops the head of `key`'s queue and starts writing its grant.
    fn start_grant(&mut self, key: &ProfileKey, previous: Option<Previous>) {
        if let Some((ticket, owner)) = self.begin_grant(key, previous) {
            self.effects.push(Effect::Grant {
                key: key.clone(),
                ticket,
                owner,
            });
        }
    }

    /// Pops the head of `key`'s queue and marks the profile as being
    /// granted to it. Returns the grant's ticket and the new holder, for
    /// the caller to have the grant written.
    fn begin_grant(
        &mut self,
        key: &ProfileKey,
        previous: Option<Previous>,
    ) -> Option<(u64, SessionId)> {
        let state = self.keys.get_mut(key)?;
        let waiter = state.queue.pop_front()?;
        self.next_id += 1;
        let ticket = self.next_id;
        if let Some(c) = self.conns.get_mut(&waiter.conn) {
            c.waiting.remove(key);
        }
        let owner = waiter.session.clone();
        if let Some(entry) = self.sessions.get_mut(&owner) {
            entry.granting.insert(key.clone());
        }
        state.force_deadline = None;
        state.holder = Holder::Granting(Box::new(Granting {
            ticket,
            waiter,
            previous,
        }));
        Some((ticket, owner))
    }

    fn expire_waiter(&mut self, key: &ProfileKey, waiter_id: u64, now: Instant) {
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        let Some(at) = state.queue.iter().position(|w| w.id == waiter_id) else {
            return;
        };
        let Some(waiter) = state.queue.remove(at) else {
            return;
        };
        if let Some(c) = self.conns.get_mut(&waiter.conn) {
            c.waiting.remove(key);
        }
        self.effects.push(Effect::Answer {
            conn: waiter.conn,
            request_id: waiter.request_id,
            result: Err(LoadError::Timeout(key.clone())),
        });
        self.pump(key, now);
    }

    /// Removes a connection and its waits; returns its session.
    fn drop_conn(&mut self, conn: ConnId, now: Instant) -> Option<SessionId> {
        let gone = self.conns.remove(&conn)?;
        for key in gone.waiting {
            if let Some(state) = self.keys.get_mut(&key) {
                state.queue.retain(|waiter| waiter.conn != conn);
            }
            self.pump(&key, now);
        }
        Some(gone.session)
    }

    /// Starts a disconnected session's resume grace; a ForceLoad waiting on
    /// one of its leases is re-evaluated, since nobody can answer it now.
    fn start_grace(&mut self, session: &SessionId, now: Instant) {
        self.next_id += 1;
        let generation = self.next_id;
        let Some(entry) = self.sessions.get_mut(session) else {
            return;
        };
        entry.generation = generation;
        if entry.held.is_empty() {
            self.sessions.remove(session);
            return;
        }
        let held: Vec<ProfileKey> = entry.held.iter().cloned().collect();
        self.arm(
            now + self.rules.resume_grace,
            Timer::Expire {
                session: session.clone(),
                generation,
            },
        );
        for key in held {
            self.pump(&key, now);
        }
    }

    /// Releases every lease `session` holds; returns how many.
    fn release_session(&mut self, session: &SessionId) -> usize {
        let Some(entry) = self.sessions.get_mut(session) else {
            return 0;
        };
        let held: Vec<ProfileKey> = entry.held.drain().collect();
        if entry.conn.is_none() {
            self.sessions.remove(session);
        }
        let mut started = 0;
        for key in held {
            let Some(state) = self.keys.get_mut(&key) else {
                continue;
            };
            if let Holder::Held(held) = &state.holder {
                let epoch = held.epoch;
                state.holder = Holder::Releasing {
                    session: session.clone(),
                };
                self.effects.push(Effect::Release {
                    key,
                    owner: session.clone(),
                    epoch,
                });
                started += 1;
            }
        }
        started
    }

    /// Gives `key` back to the holder a failed grant would have replaced.
    /// If that session has meanwhile let its leases go (it stayed away past
    /// its grace, or the daemon is releasing everything), nothing will
    /// release this one for it, so the daemon does.
    fn reinstate(&mut self, key: &ProfileKey, held: Held) {
        let kept = self
            .sessions
            .get(&held.session)
            .is_some_and(|session| session.held.contains(key));
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        if kept {
            state.holder = Holder::Held(held);
        } else {
            state.holder = Holder::Releasing {
                session: held.session.clone(),
            };
            self.effects.push(Effect::Release {
                key: key.clone(),
                owner: held.session,
                epoch: held.epoch,
            });
        }
    }

    /// Puts back a waiter whose grant failed with its holder's release, at
    /// the head of its kind (ForceLoads and Steals ahead of Repeats), with
    /// its deadlines re-armed. A waiter whose connection has gone is
    /// dropped; one that a newer ForceLoad or Steal arrived behind is
    /// superseded, since the newest demand wins.
    fn requeue(&mut self, key: &ProfileKey, waiter: Waiter, force_deadline: Option<Instant>) {
        let answer = |result| Effect::Answer {
            conn: waiter.conn,
            request_id: waiter.request_id,
            result,
        };
        if self.stopping {
            self.effects.push(answer(Err(LoadError::ShuttingDown)));
            return;
        }
        let Some(conn) = self.conns.get_mut(&waiter.conn) else {
            return;
        };
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        let demands = |w: &Waiter| matches!(w.policy, LoadPolicy::ForceLoad | LoadPolicy::Steal);
        if waiter.policy == LoadPolicy::ForceLoad && state.queue.iter().any(demands) {
            self.effects
                .push(answer(Err(LoadError::Superseded(key.clone()))));
            return;
        }
        conn.waiting.insert(key.clone());
        let at = if demands(&waiter) {
            0
        } else {
            state
                .queue
                .iter()
                .position(|w| !demands(w))
                .unwrap_or(state.queue.len())
        };
        // Only a heading ForceLoad has a holder's patience to keep.
        let force_deadline = force_deadline.filter(|_| waiter.policy == LoadPolicy::ForceLoad);
        state.force_deadline = force_deadline;
        let deadline = waiter.deadline.map(|at| (at, waiter.id));
        state.queue.insert(at, waiter);
        if let Some(at) = force_deadline {
            self.arm(at, Timer::Force { key: key.clone() });
        }
        if let Some((at, waiter)) = deadline {
            self.arm(
                at,
                Timer::Deadline {
                    key: key.clone(),
                    waiter,
                },
            );
        }
    }

    /// Drops `key` from a session's leases, and the session itself once it
    /// is away and holds nothing.
    fn forget_lease(&mut self, session: &SessionId, key: &ProfileKey) {
        if let Some(entry) = self.sessions.get_mut(session) {
            entry.held.remove(key);
            if entry.conn.is_none() && entry.held.is_empty() {
                self.sessions.remove(session);
            }
        }
    }

    /// The connection a session is on, if it is connected.
    fn conn_of(&self, session: &SessionId) -> Option<ConnId> {
        self.sessions.get(session).and_then(|s| s.conn)
    }

    fn arm(&mut self, at: Instant, timer: Timer) {
        self.next_id += 1;
        self.timers.insert((at, self.next_id), timer);
    }
}

impl Previous {
    fn held(&self) -> &Held {
        match self {
            Self::Taken(held, _) | Self::Releasing { held, .. } => held,
        }
    }

    fn into_held(self) -> Held {
        match self {
            Self::Taken(held, _) | Self::Releasing { held, .. } => held,
        }
    }
}

impl KeyState {
    /// Whether `session` holds, is being granted, or waits for this profile.
    fn involves(&self, session: &SessionId) -> bool {
        let holds = match &self.holder {
            Holder::Granting(granting) => granting.waiter.session == *session,
            Holder::Held(held) => held.session == *session,
            Holder::Free | Holder::Releasing { .. } => false,
        };
        holds || self.queue.iter().any(|w| w.session == *session)
    }

    /// The session that holds, or is about to hold, the profile.
    fn owner(&self) -> Option<&SessionId> {
        match &self.holder {
            Holder::Free => None,
            Holder::Granting(granting) => Some(&granting.waiter.session),
            Holder::Held(held) => Some(&held.session),
            Holder::Releasing { session } => Some(session),
        }
    }
}

/// The profile an effect releases, if it is a release.
fn released_key(effect: &Effect) -> Option<&ProfileKey> {
    match effect {
        Effect::Release { key, .. } => Some(key),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{LeaseRecord, MetaRecord};

    const TIMEOUT: Duration = Duration::from_secs(5);
    const GRACE: Duration = Duration::from_secs(10);

    fn rules() -> LeaseRules {
        LeaseRules {
            force_load_timeout: TIMEOUT,
            resume_grace: GRACE,
            take_disconnected_at_once: false,
            max_leases_per_session: usize::MAX,
        }
    }

    fn key() -> ProfileKey {
        ProfileKey::new("s", "k")
    }

    fn session(job: &str) -> SessionId {
        SessionId {
            place_id: 1,
            job_id: job.to_owned(),
        }
    }

    /// A table with connections 1..=n for sessions "s1".."sn".
    fn table(n: u64) -> LeaseTable {
        table_with(rules(), n)
    }

    /// [`table`] under `rules`.
    fn table_with(rules: LeaseRules, n: u64) -> LeaseTable {
        let mut table = LeaseTable::new(rules);
        for conn in 1..=n {
            table.connect(conn, session(&format!("s{conn}")), Instant::now());
        }
        table
    }

    fn load(table: &mut LeaseTable, conn: ConnId, policy: LoadPolicy, now: Instant) {
        table.load(
            LoadRequest {
                conn,
                request_id: conn * 100,
                key: key(),
                policy,
                deadline: None,
            },
            now,
        );
    }

    /// Completes the single pending grant with epoch `epoch` and returns the
    /// effects that followed.
    fn complete_grant(
        table: &mut LeaseTable,
        effects: Vec<Effect>,
        epoch: u64,
        now: Instant,
    ) -> Vec<Effect> {
        let grants: Vec<_> = effects
            .into_iter()
            .filter_map(|effect| match effect {
                Effect::Grant { key, ticket, owner } => Some((key, ticket, owner)),
                _ => None,
            })
            .collect();
        assert_eq!(grants.len(), 1, "exactly one grant pending");
        let (key, ticket, owner) = grants.into_iter().next().expect("one grant");
        let granted = Granted {
            lease: LeaseRecord {
                session: owner,
                epoch,
                since_ms: 0,
                uid: None,
            },
            meta: MetaRecord::default(),
            data: None,
            messages: Vec::new(),
        };
        table.grant_done(&key, ticket, Ok(granted), now);
        table.take_effects()
    }

    fn answers(effects: &[Effect]) -> Vec<(ConnId, Result<u64, LoadError>)> {
        effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::Answer { conn, result, .. } => Some((
                    *conn,
                    result.as_ref().map(|g| g.lease.epoch).map_err(Clone::clone),
                )),
                _ => None,
            })
            .collect()
    }

    fn pushes(effects: &[Effect]) -> Vec<(ConnId, LeaseEvent)> {
        effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::Push { conn, event } => Some((*conn, event.clone())),
                _ => None,
            })
            .collect()
    }

    /// Session 1 holds the key with epoch 1.
    fn held_by_one(n: u64, now: Instant) -> LeaseTable {
        let mut table = table(n);
        load(&mut table, 1, LoadPolicy::ForceLoad, now);
        let effects = table.take_effects();
        let done = complete_grant(&mut table, effects, 1, now);
        assert_eq!(answers(&done), vec![(1, Ok(1))]);
        table
    }

    /// A session may hold `max_leases_per_session` leases, grants being
    /// written included. A load beyond it is refused once it is first in
    /// line, before the profile is asked of or taken from its holder, and the
    /// next in line is served instead, a handoff included.
    #[test]
    fn a_session_at_its_lease_limit_is_refused_and_the_next_in_line_is_served() {
        let now = Instant::now();
        let limited = LeaseRules {
            max_leases_per_session: 2,
            ..rules()
        };
        let mut table = table_with(limited, 3);
        let named = |name: &str| ProfileKey::new("s", name);
        let load_named = |table: &mut LeaseTable, conn, name: &str, policy| {
            table.load(
                LoadRequest {
                    conn,
                    request_id: 1,
                    key: named(name),
                    policy,
                    deadline: None,
                },
                now,
            );
            table.take_effects()
        };
        let refused = |conn, name: &str| {
            vec![(
                conn,
                Err(LoadError::TooManyLeases {
                    key: named(name),
                    limit: 2,
                }),
            )]
        };

        // Two grants under way count: a third load is refused at once.
        let a = load_named(&mut table, 1, "a", LoadPolicy::ForceLoad);
        let b = load_named(&mut table, 1, "b", LoadPolicy::ForceLoad);
        let c = load_named(&mut table, 1, "c", LoadPolicy::ForceLoad);
        assert_eq!(answers(&c), refused(1, "c"));
        assert_eq!(
            answers(&complete_grant(&mut table, a, 1, now)),
            vec![(1, Ok(1))]
        );
        assert_eq!(
            answers(&complete_grant(&mut table, b, 1, now)),
            vec![(1, Ok(1))]
        );

        // Session 2 holds "x". Session 1's ForceLoad of it is refused
        // without asking session 2 for it.
        let x = load_named(&mut table, 2, "x", LoadPolicy::ForceLoad);
        complete_grant(&mut table, x, 1, now);
        let forced = load_named(&mut table, 1, "x", LoadPolicy::ForceLoad);
        assert_eq!(answers(&forced), refused(1, "x"));
        assert!(pushes(&forced).is_empty(), "{forced:?}");

        // A release makes room: 1 waits for "x" ahead of 3, then takes
        // "c", so on 2's release "x" goes to 3 and 1 is refused.
        assert_eq!(table.releasing(&named("a"), &session("s1"), 1), None);
        table.released(&named("a"), 1, now);
        table.take_effects();
        assert!(load_named(&mut table, 1, "x", LoadPolicy::Repeat).is_empty());
        assert!(load_named(&mut table, 3, "x", LoadPolicy::Repeat).is_empty());
        let c = load_named(&mut table, 1, "c", LoadPolicy::ForceLoad);
        assert_eq!(
            answers(&complete_grant(&mut table, c, 1, now)),
            vec![(1, Ok(1))]
        );
        let hand_over = table.releasing(&named("x"), &session("s2"), 1);
        assert_eq!(hand_over.map(|h| h.next), Some(session("s3")));
        assert_eq!(answers(&table.take_effects()), refused(1, "x"));
        let d = load_named(&mut table, 1, "d", LoadPolicy::ForceLoad);
        assert_eq!(answers(&d), refused(1, "d"));
    }

    /// A release that does not count (another epoch) refuses no waiter,
    /// and a ForceLoad refused at the limit takes its deadline with it, so
    /// the next ForceLoad asks the holder again.
    #[test]
    fn a_refusal_at_the_lease_limit_leaves_no_stale_force_deadline() {
        let now = Instant::now();
        let limited = LeaseRules {
            max_leases_per_session: 1,
            ..rules()
        };
        let mut table = table_with(limited, 3);
        let asked = |effects: &[Effect]| {
            pushes(effects).iter().any(|(conn, event)| {
                *conn == 1 && matches!(event, LeaseEvent::ReleaseRequested { .. })
            })
        };
        load(&mut table, 1, LoadPolicy::ForceLoad, now);
        let effects = table.take_effects();
        complete_grant(&mut table, effects, 1, now);
        load(&mut table, 2, LoadPolicy::ForceLoad, now);
        assert!(asked(&table.take_effects()), "the holder is asked for 2");
        table.load(
            LoadRequest {
                conn: 2,
                request_id: 7,
                key: ProfileKey::new("s", "other"),
                policy: LoadPolicy::ForceLoad,
                deadline: None,
            },
            now,
        );
        let effects = table.take_effects();
        complete_grant(&mut table, effects, 1, now);

        assert_eq!(table.releasing(&key(), &session("s1"), 99), None);
        assert!(
            table.take_effects().is_empty(),
            "another epoch refuses nobody"
        );
        assert_eq!(table.releasing(&key(), &session("s1"), 1), None);
        assert_eq!(
            answers(&table.take_effects()),
            vec![(
                2,
                Err(LoadError::TooManyLeases {
                    key: key(),
                    limit: 1
                })
            )]
        );
        load(&mut table, 3, LoadPolicy::ForceLoad, now);
        assert!(
            asked(&table.take_effects()),
            "the holder is asked again for 3"
        );
    }

    #[test]
    fn a_revoked_lease_tells_its_holder_and_frees_the_profile_for_the_queue() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        load(&mut table, 2, LoadPolicy::Repeat, now);
        assert!(table.take_effects().is_empty(), "repeat waits quietly");
        table.revoked(&key(), 1, LossReason::Wiped, now);
        let effects = table.take_effects();
        assert_eq!(
            pushes(&effects),
            vec![(
                1,
                LeaseEvent::LeaseLost {
                    key: key(),
                    epoch: 1,
                    reason: LossReason::Wiped,
                    new_owner: None
                }
            )]
        );
        let done = complete_grant(&mut table, effects, 2, now);
        assert_eq!(answers(&done), vec![(2, Ok(2))]);
        assert_eq!(table.holder(&key()), Some((&session("s2"), 2)));
        assert_eq!(table.sessions()[0].leases, Vec::<(ProfileKey, u64)>::new());
    }

    #[test]
    fn a_revoke_of_an_older_epoch_changes_nothing() {
        let now = Instant::now();
        let mut table = held_by_one(1, now);
        table.revoked(&key(), 7, LossReason::Revoked, now);
        assert!(table.take_effects().is_empty());
        assert_eq!(table.holder(&key()), Some((&session("s1"), 1)));
    }

    #[test]
    fn asking_for_a_release_pushes_a_request_without_queueing() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        let holder = table.ask_release(&key(), session("admin"));
        assert_eq!(holder, Some((session("s1"), 1)));
        assert_eq!(
            pushes(&table.take_effects()),
            vec![(
                1,
                LeaseEvent::ReleaseRequested {
                    key: key(),
                    epoch: 1,
                    requester: session("admin")
                }
            )]
        );
        assert_eq!(table.queued(), 0);
        assert_eq!(
            table.ask_release(&ProfileKey::new("s", "free"), session("a")),
            None
        );
    }

    #[test]
    fn a_free_profile_is_granted_at_once() {
        let now = Instant::now();
        let table = held_by_one(1, now);
        assert_eq!(table.held(), 1);
    }

    #[test]
    fn the_same_session_cannot_load_twice() {
        let now = Instant::now();
        let mut table = held_by_one(1, now);
        load(&mut table, 1, LoadPolicy::Steal, now);
        assert_eq!(
            answers(&table.take_effects()),
            vec![(1, Err(LoadError::AlreadyLoaded(key())))]
        );
    }

    #[test]
    fn cancel_names_the_owner() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        load(&mut table, 2, LoadPolicy::Cancel, now);
        assert_eq!(
            answers(&table.take_effects()),
            vec![(
                2,
                Err(LoadError::Taken {
                    key: key(),
                    owner: session("s1")
                })
            )]
        );
    }

    #[test]
    fn force_load_asks_then_takes_after_the_timeout() {
        let start = Instant::now();
        let mut table = held_by_one(2, start);
        load(&mut table, 2, LoadPolicy::ForceLoad, start);
        let effects = table.take_effects();
        assert_eq!(
            pushes(&effects),
            vec![(
                1,
                LeaseEvent::ReleaseRequested {
                    key: key(),
                    epoch: 1,
                    requester: session("s2")
                }
            )]
        );
        assert!(answers(&effects).is_empty());
        assert_eq!(table.next_timer(), Some(start + TIMEOUT));

        table.fire_timers(start + TIMEOUT - Duration::from_millis(1));
        assert!(table.take_effects().is_empty(), "not before the timeout");

        table.fire_timers(start + TIMEOUT);
        let effects = table.take_effects();
        let done = complete_grant(&mut table, effects, 2, start + TIMEOUT);
        assert_eq!(answers(&done), vec![(2, Ok(2))]);
        assert_eq!(
            pushes(&done),
            vec![(
                1,
                LeaseEvent::LeaseLost {
                    key: key(),
                    epoch: 1,
                    reason: LossReason::ForceLoadTimeout,
                    new_owner: Some(session("s2"))
                }
            )]
        );
    }

    #[test]
    fn force_load_is_granted_as_soon_as_the_owner_releases() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        load(&mut table, 2, LoadPolicy::ForceLoad, now);
        table.take_effects();
        table.released(&key(), 1, now);
        let effects = table.take_effects();
        let done = complete_grant(&mut table, effects, 2, now);
        assert_eq!(answers(&done), vec![(2, Ok(2))]);
        assert!(
            pushes(&done).is_empty(),
            "a cooperative owner loses nothing"
        );
    }

    #[test]
    fn a_release_with_a_waiter_starts_its_grant_behind_it() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        load(&mut table, 2, LoadPolicy::ForceLoad, now);
        table.take_effects();
        let hand_over = table.releasing(&key(), &session("s1"), 1);
        let Some(HandOver { ticket, next }) = hand_over else {
            panic!("the waiter's grant starts before the release is durable");
        };
        assert_eq!(next, session("s2"));
        assert!(table.take_effects().is_empty());
        table.released(&key(), 1, now);
        let effects = vec![Effect::Grant {
            key: key(),
            ticket,
            owner: next,
        }];
        let done = complete_grant(&mut table, effects, 2, now);
        assert_eq!(answers(&done), vec![(2, Ok(2))]);
        assert!(pushes(&done).is_empty(), "a releasing holder loses nothing");
        assert_eq!(table.holder(&key()), Some((&session("s2"), 2)));
        let s1 = table
            .sessions()
            .into_iter()
            .find(|s| s.session == session("s1"));
        assert!(s1.is_some_and(|s| s.leases.is_empty()));
    }

    #[test]
    fn a_release_nobody_waits_for_starts_nothing() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        assert_eq!(table.releasing(&key(), &session("s1"), 1), None);
        assert!(table.take_effects().is_empty());
        assert_eq!(table.holder(&key()), Some((&session("s1"), 1)));
        table.released(&key(), 1, now);
        assert!(table.is_idle());
    }

    #[test]
    fn a_failed_release_keeps_the_holder_and_the_load_waiting() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        load(&mut table, 2, LoadPolicy::Repeat, now);
        let Some(HandOver { ticket, .. }) = table.releasing(&key(), &session("s1"), 1) else {
            panic!("expected a grant");
        };
        // Storage refused the grant: the release with it failed.
        table.grant_done(&key(), ticket, Err(WriteError::Held), now);
        let effects = table.take_effects();
        assert!(
            answers(&effects).is_empty(),
            "the load waits on: {effects:?}"
        );
        assert!(pushes(&effects).is_empty());
        assert_eq!(table.holder(&key()), Some((&session("s1"), 1)));
        assert_eq!(table.queued(), 1);
        // The holder releases again, and the load is granted.
        table.released(&key(), 1, now);
        let effects = table.take_effects();
        let done = complete_grant(&mut table, effects, 2, now);
        assert_eq!(answers(&done), vec![(2, Ok(2))]);
    }

    /// A holder that reconnects while its release is being handed over is
    /// not told of that lease in its welcome, so it takes it as gone. If
    /// the hand-over then fails, the daemon releases the lease rather than
    /// hand it back to a client that has let it go.
    #[test]
    fn a_failed_hand_over_of_a_holder_that_reconnected_meanwhile_releases_the_lease() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        load(&mut table, 2, LoadPolicy::Repeat, now);
        let Some(HandOver { ticket, .. }) = table.releasing(&key(), &session("s1"), 1) else {
            panic!("expected a grant");
        };
        table.disconnect(1, now);
        let connected = table.connect(3, session("s1"), now);
        assert!(connected.leases.is_empty(), "not in the welcome");
        table.take_effects();
        table.grant_done(&key(), ticket, Err(WriteError::Held), now);
        let effects = table.take_effects();
        assert!(
            matches!(
                effects.as_slice(),
                [Effect::Release { epoch: 1, owner, .. }] if *owner == session("s1")
            ),
            "released by the daemon: {effects:?}"
        );
        assert_eq!(table.holder(&key()), None, "no longer held by s1");
        table.release_done(&key(), now);
        let effects = table.take_effects();
        let done = complete_grant(&mut table, effects, 2, now);
        assert_eq!(answers(&done), vec![(2, Ok(2))], "the load is granted");
    }

    #[test]
    fn a_force_load_back_from_a_failed_release_keeps_its_deadline() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        load(&mut table, 2, LoadPolicy::ForceLoad, now);
        table.take_effects();
        let later = now + TIMEOUT / 2;
        let Some(HandOver { ticket, .. }) = table.releasing(&key(), &session("s1"), 1) else {
            panic!("expected a grant");
        };
        table.grant_done(&key(), ticket, Err(WriteError::Held), later);
        assert!(answers(&table.take_effects()).is_empty());
        // The patience that began at the load runs out as it would have.
        table.fire_timers(now + TIMEOUT);
        let effects = table.take_effects();
        let done = complete_grant(&mut table, effects, 2, now + TIMEOUT);
        assert_eq!(answers(&done), vec![(2, Ok(2))]);
        assert!(matches!(
            pushes(&done).as_slice(),
            [(
                1,
                LeaseEvent::LeaseLost {
                    reason: LossReason::ForceLoadTimeout,
                    ..
                }
            )]
        ));
    }

    #[test]
    fn only_the_holder_s_own_release_hands_the_profile_over() {
        let now = Instant::now();
        let mut table = held_by_one(3, now);
        load(&mut table, 2, LoadPolicy::ForceLoad, now);
        table.take_effects();
        assert_eq!(table.releasing(&key(), &session("s3"), 1), None);
        assert_eq!(table.releasing(&key(), &session("s1"), 2), None);
        assert_eq!(table.queued(), 1, "the waiter is still queued");
        assert_eq!(table.holder(&key()), Some((&session("s1"), 1)));
    }

    #[test]
    fn a_failed_hand_over_of_a_holder_gone_meanwhile_is_released_for_the_waiter() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        load(&mut table, 2, LoadPolicy::Repeat, now);
        let Some(HandOver { ticket, .. }) = table.releasing(&key(), &session("s1"), 1) else {
            panic!("expected a grant");
        };
        // The holder leaves and its grace runs out while its release is
        // being written; then the release, and the grant with it, fail.
        table.disconnect(1, now);
        table.fire_timers(now + GRACE);
        assert!(
            table.take_effects().is_empty(),
            "the lease was being handed over"
        );
        table.grant_done(&key(), ticket, Err(WriteError::Held), now + GRACE);
        let effects = table.take_effects();
        assert!(
            answers(&effects).is_empty(),
            "the load waits on: {effects:?}"
        );
        assert!(
            matches!(effects.as_slice(), [Effect::Release { epoch: 1, .. }]),
            "nobody else would release the lease: {effects:?}"
        );
        table.release_done(&key(), now + GRACE);
        let effects = table.take_effects();
        let done = complete_grant(&mut table, effects, 2, now + GRACE);
        assert_eq!(answers(&done), vec![(2, Ok(2))]);
    }

    #[test]
    fn a_failed_grant_gives_back_to_a_session_gone_meanwhile_by_releasing() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        load(&mut table, 2, LoadPolicy::Steal, now);
        let Some(Effect::Grant { ticket, .. }) = table.take_effects().into_iter().next() else {
            panic!("expected a grant");
        };
        // The holder leaves and its grace runs out while the steal is being
        // written; that grant then fails.
        table.disconnect(1, now);
        table.fire_timers(now + GRACE);
        assert!(
            table.take_effects().is_empty(),
            "the lease was being granted"
        );
        table.grant_done(
            &key(),
            ticket,
            Err(WriteError::Storage("disk".into())),
            now + GRACE,
        );
        let effects = table.take_effects();
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Release { epoch: 1, .. })),
            "nobody would ever release the old lease otherwise: {effects:?}"
        );
        table.release_done(&key(), now + GRACE);
        assert!(table.is_idle());
    }

    #[test]
    fn the_newest_force_load_wins() {
        let now = Instant::now();
        let mut table = held_by_one(3, now);
        load(&mut table, 2, LoadPolicy::ForceLoad, now);
        table.take_effects();
        load(&mut table, 3, LoadPolicy::ForceLoad, now);
        assert_eq!(
            answers(&table.take_effects()),
            vec![(2, Err(LoadError::Superseded(key())))]
        );
        table.released(&key(), 1, now);
        let effects = table.take_effects();
        let done = complete_grant(&mut table, effects, 2, now);
        assert_eq!(answers(&done), vec![(3, Ok(2))]);
    }

    #[test]
    fn steal_takes_at_once() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        load(&mut table, 2, LoadPolicy::Steal, now);
        let effects = table.take_effects();
        let done = complete_grant(&mut table, effects, 2, now);
        assert_eq!(answers(&done), vec![(2, Ok(2))]);
        assert!(matches!(
            pushes(&done).as_slice(),
            [(
                1,
                LeaseEvent::LeaseLost {
                    reason: LossReason::Stolen,
                    ..
                }
            )]
        ));
    }

    #[test]
    fn repeat_waits_without_asking_and_only_the_head_is_woken() {
        let now = Instant::now();
        let mut table = held_by_one(3, now);
        load(&mut table, 2, LoadPolicy::Repeat, now);
        load(&mut table, 3, LoadPolicy::Repeat, now);
        assert!(
            table.take_effects().is_empty(),
            "no release request for Repeat"
        );
        assert_eq!(table.next_timer(), None);
        table.released(&key(), 1, now);
        let effects = table.take_effects();
        let done = complete_grant(&mut table, effects, 2, now);
        assert_eq!(answers(&done), vec![(2, Ok(2))]);
        assert_eq!(table.queued(), 1, "the second waiter still waits");
    }

    #[test]
    fn a_waiter_deadline_ends_with_timeout() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        table.load(
            LoadRequest {
                conn: 2,
                request_id: 9,
                key: key(),
                policy: LoadPolicy::Repeat,
                deadline: Some(now + Duration::from_secs(1)),
            },
            now,
        );
        table.fire_timers(now + Duration::from_secs(1));
        assert_eq!(
            answers(&table.take_effects()),
            vec![(2, Err(LoadError::Timeout(key())))]
        );
        assert_eq!(table.queued(), 0);
    }

    #[test]
    fn a_disconnected_session_keeps_its_leases_until_the_grace_runs_out() {
        let now = Instant::now();
        let mut table = held_by_one(3, now);
        load(&mut table, 2, LoadPolicy::Repeat, now);
        table.disconnect(1, now);
        assert!(table.take_effects().is_empty(), "nothing is released yet");
        assert_eq!(table.held(), 1);

        table.fire_timers(now + GRACE - Duration::from_millis(1));
        assert!(table.take_effects().is_empty());
        table.fire_timers(now + GRACE);
        let effects = table.take_effects();
        assert!(matches!(
            effects.as_slice(),
            [Effect::Release { epoch: 1, .. }]
        ));
        table.release_done(&key(), now + GRACE);
        let effects = table.take_effects();
        let done = complete_grant(&mut table, effects, 2, now + GRACE);
        assert_eq!(answers(&done), vec![(2, Ok(2))]);
    }

    #[test]
    fn a_session_that_reconnects_in_time_resumes_its_leases() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        table.disconnect(1, now);
        let later = now + GRACE / 2;
        let connected = table.connect(7, session("s1"), later);
        assert_eq!(connected.leases, vec![(key(), 1)]);
        table.fire_timers(now + GRACE * 2);
        assert!(
            table.take_effects().is_empty(),
            "the old expiry does nothing"
        );
        // The resumed holder answers to the new connection.
        load(&mut table, 2, LoadPolicy::ForceLoad, later);
        assert!(matches!(
            pushes(&table.take_effects()).as_slice(),
            [(7, LeaseEvent::ReleaseRequested { .. })]
        ));
    }

    #[test]
    fn a_second_connection_takes_the_session_over() {
        let now = Instant::now();
        let mut table = held_by_one(1, now);
        let connected = table.connect(9, session("s1"), now);
        assert_eq!(connected.leases, vec![(key(), 1)]);
        assert!(matches!(
            table.take_effects().as_slice(),
            [Effect::Kick { conn: 1 }]
        ));
        // The kicked connection's own disconnect must not end the session.
        table.disconnect(1, now);
        table.fire_timers(now + GRACE * 2);
        assert!(table.take_effects().is_empty());
        assert_eq!(table.held(), 1);
    }

    #[test]
    fn force_load_on_a_disconnected_holder_waits_for_the_grace_without_asking() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        table.disconnect(1, now);
        load(&mut table, 2, LoadPolicy::ForceLoad, now);
        assert!(table.take_effects().is_empty(), "nobody to ask");
        table.fire_timers(now + TIMEOUT);
        assert!(
            table.take_effects().is_empty(),
            "force_load_timeout does not apply"
        );
        table.fire_timers(now + GRACE);
        let effects = table.take_effects();
        assert!(matches!(effects.as_slice(), [Effect::Release { .. }]));
        table.release_done(&key(), now + GRACE);
        let effects = table.take_effects();
        assert_eq!(
            answers(&complete_grant(&mut table, effects, 2, now)),
            vec![(2, Ok(2))]
        );
    }

    #[test]
    fn force_load_can_take_a_disconnected_holder_at_once() {
        let now = Instant::now();
        let mut table = LeaseTable::new(LeaseRules {
            take_disconnected_at_once: true,
            ..rules()
        });
        table.connect(1, session("s1"), now);
        table.connect(2, session("s2"), now);
        load(&mut table, 1, LoadPolicy::ForceLoad, now);
        let effects = table.take_effects();
        complete_grant(&mut table, effects, 1, now);
        table.disconnect(1, now);
        load(&mut table, 2, LoadPolicy::ForceLoad, now);
        let effects = table.take_effects();
        assert_eq!(
            answers(&complete_grant(&mut table, effects, 2, now)),
            vec![(2, Ok(2))]
        );
    }

    #[test]
    fn recovered_leases_wait_for_their_sessions_then_expire() {
        let now = Instant::now();
        let mut table = LeaseTable::new(rules());
        table.recover(vec![(key(), session("old"), 4)], now);
        assert_eq!(table.held(), 1);
        let connected = table.connect(1, session("old"), now + GRACE / 2);
        assert_eq!(connected.leases, vec![(key(), 4)]);

        let mut table = LeaseTable::new(rules());
        table.recover(vec![(key(), session("gone"), 4)], now);
        table.fire_timers(now + GRACE);
        assert!(matches!(
            table.take_effects().as_slice(),
            [Effect::Release { epoch: 4, .. }]
        ));
    }

    #[test]
    fn while_stopping_a_disconnect_releases_at_once() {
        let now = Instant::now();
        let mut table = held_by_one(1, now);
        table.stop_loads();
        table.announce_shutdown(Duration::from_secs(3));
        assert!(matches!(
            pushes(&table.take_effects()).as_slice(),
            [(1, LeaseEvent::ShuttingDown { deadline_ms: 3000 })]
        ));
        table.disconnect(1, now);
        assert!(matches!(
            table.take_effects().as_slice(),
            [Effect::Release { epoch: 1, .. }]
        ));
    }

    #[test]
    fn a_failed_grant_leaves_the_holder_in_place() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        load(&mut table, 2, LoadPolicy::Steal, now);
        let Some(Effect::Grant { ticket, .. }) = table.take_effects().into_iter().next() else {
            panic!("expected a grant");
        };
        table.grant_done(&key(), ticket, Err(WriteError::Storage("disk".into())), now);
        let effects = table.take_effects();
        assert!(matches!(
            answers(&effects).as_slice(),
            [(2, Err(LoadError::Storage(_)))]
        ));
        assert!(pushes(&effects).is_empty());
        assert_eq!(table.held(), 1);
    }

    #[test]
    fn stopping_refuses_loads_and_release_all_frees_everything() {
        let now = Instant::now();
        let mut table = held_by_one(2, now);
        load(&mut table, 2, LoadPolicy::Repeat, now);
        table.stop_loads();
        assert_eq!(
            answers(&table.take_effects()),
            vec![(2, Err(LoadError::ShuttingDown))]
        );
        load(&mut table, 2, LoadPolicy::ForceLoad, now);
        assert_eq!(
            answers(&table.take_effects()),
            vec![(2, Err(LoadError::ShuttingDown))]
        );
        assert_eq!(table.release_all(), 1);
        table.take_effects();
        assert!(!table.is_idle());
        table.release_done(&key(), now);
        assert!(table.is_idle());
    }

    #[test]
    fn release_all_releases_every_lease_once_in_key_order() {
        let now = Instant::now();
        let mut table = table(3);
        let leases: Vec<(ProfileKey, SessionId, u64)> = (0..200u64)
            .map(|n| {
                let key =
                    ProfileKey::new(format!("store{}", n % 3), format!("k{}", n * 7919 % 200));
                (key, session(&format!("s{}", n % 4 + 1)), n + 1)
            })
            .collect();
        table.recover(leases.clone(), now);
        table.take_effects();
        assert_eq!(table.release_all(), leases.len());
        let released: Vec<ProfileKey> = table
            .take_effects()
            .into_iter()
            .filter_map(|effect| match effect {
                Effect::Release { key, .. } => Some(key),
                _ => None,
            })
            .collect();
        let mut expected: Vec<ProfileKey> = leases.into_iter().map(|(key, _, _)| key).collect();
        expected.sort();
        assert_eq!(released, expected);
    }

    /// Random walks over loads, releases, disconnects, reconnects, storage
    /// completions (in any order) and the passage of time. After every step
    /// the clients' view must be consistent: each load is answered at most
    /// once, epochs rise per profile, and before a profile is granted again
    /// its previous holder has released it, been told it lost it, or had it
    /// released by the daemon.
    #[test]
    fn random_walks_keep_the_clients_view_consistent() {
        for seed in 1..=300u64 {
            random_walk(seed);
        }
    }

    fn random_walk(seed: u64) {
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let keys = [ProfileKey::new("s", "a"), ProfileKey::new("s", "b")];
        let sessions = 4u64;
        let mut now = Instant::now();
        let mut table = LeaseTable::new(LeaseRules {
            force_load_timeout: Duration::from_millis(50),
            resume_grace: Duration::from_millis(80),
            take_disconnected_at_once: next(2) == 0,
            max_leases_per_session: usize::MAX,
        });
        // conn ids: session s uses conn s + 10 * generation.
        let mut conn_of: Vec<Option<ConnId>> = vec![None; sessions as usize];
        let mut generation = 0u64;
        let mut pending_grants: Vec<(ProfileKey, u64, SessionId, bool)> = Vec::new();
        let mut pending_releases: Vec<ProfileKey> = Vec::new();
        // Holders' own releases that storage applied but the table has not
        // yet heard of.
        let mut pending_released: Vec<(ProfileKey, u64)> = Vec::new();
        // Epochs come from one counter, so they rise per profile and also
        // tell which profile an answered grant was for.
        let mut last_epoch = 0u64;
        let mut key_of_epoch: HashMap<u64, ProfileKey> = HashMap::new();
        // The clients' view: who was last granted each key, under which
        // epoch, and whether that grant has ended.
        let mut granted: HashMap<ProfileKey, (SessionId, u64, bool)> = HashMap::new();
        let mut answered: HashSet<(ConnId, u64)> = HashSet::new();
        let mut request = 0u64;

        for _ in 0..400 {
            match next(9) {
                0 | 1 => {
                    let s = next(sessions);
                    let conn = match conn_of[s as usize] {
                        Some(conn) => conn,
                        None => {
                            generation += 1;
                            let conn = s + 10 * generation;
                            table.connect(conn, session(&format!("s{s}")), now);
                            conn_of[s as usize] = Some(conn);
                            conn
                        }
                    };
                    request += 1;
                    let policy = [
                        LoadPolicy::ForceLoad,
                        LoadPolicy::Steal,
                        LoadPolicy::Repeat,
                        LoadPolicy::Cancel,
                    ][next(4) as usize];
                    let deadline = (next(3) == 0).then(|| now + Duration::from_millis(next(100)));
                    table.load(
                        LoadRequest {
                            conn,
                            request_id: request,
                            key: keys[next(2) as usize].clone(),
                            policy,
                            deadline,
                        },
                        now,
                    );
                }
                2 => {
                    // The current holder of a key releases it, if connected.
                    let key = keys[next(2) as usize].clone();
                    if let Some((owner, epoch, false)) = granted.get(&key).cloned() {
                        let s: usize = owner.job_id[1..].parse().expect("session index");
                        if conn_of[s].is_some() {
                            // Storage applies a hand-over's release and
                            // grant together, so whether it refuses the
                            // grant is decided now: when the release fails,
                            // and the client still holds the lease.
                            let outcome = next(4);
                            if let Some(HandOver { ticket, next }) =
                                table.releasing(&key, &owner, epoch)
                            {
                                pending_grants.push((key.clone(), ticket, next, outcome == 0));
                            }
                            if outcome != 0 {
                                // The release succeeds; the table hears of
                                // it now or later.
                                if outcome == 1 {
                                    pending_released.push((key.clone(), epoch));
                                } else {
                                    table.released(&key, epoch, now);
                                }
                                if let Some(entry) = granted.get_mut(&key) {
                                    entry.2 = true;
                                }
                            }
                        }
                    }
                }
                3 => {
                    // A client that disconnects holds nothing it can use
                    // until a new Welcome lists what it resumed, so its
                    // grants end in its own view.
                    let s = next(sessions) as usize;
                    if let Some(conn) = conn_of[s].take() {
                        table.disconnect(conn, now);
                        let name = session(&format!("s{s}"));
                        for entry in granted.values_mut() {
                            if entry.0 == name {
                                entry.2 = true;
                            }
                        }
                    }
                }
                4 | 5 if !pending_grants.is_empty() => {
                    let at = next(pending_grants.len() as u64) as usize;
                    let (key, ticket, owner, refused) = pending_grants.remove(at);
                    if refused {
                        table.grant_done(&key, ticket, Err(WriteError::Held), now);
                    } else if next(10) == 0 {
                        table.grant_done(&key, ticket, Err(WriteError::Storage("x".into())), now);
                    } else {
                        last_epoch += 1;
                        key_of_epoch.insert(last_epoch, key.clone());
                        let granted_record = Granted {
                            lease: LeaseRecord {
                                session: owner,
                                epoch: last_epoch,
                                since_ms: 0,
                                uid: None,
                            },
                            meta: MetaRecord::default(),
                            data: None,
                            messages: Vec::new(),
                        };
                        table.grant_done(&key, ticket, Ok(granted_record), now);
                    }
                }
                6 if !pending_releases.is_empty() => {
                    let key = pending_releases.remove(0);
                    table.release_done(&key, now);
                }
                7 if !pending_released.is_empty() => {
                    let (key, epoch) = pending_released.remove(0);
                    table.released(&key, epoch, now);
                }
                _ => {
                    now += Duration::from_millis(next(60));
                    table.fire_timers(now);
                }
            }
            for effect in table.take_effects() {
                match effect {
                    Effect::Grant { key, ticket, owner } => {
                        pending_grants.push((key, ticket, owner, false))
                    }
                    Effect::Release { key, epoch, .. } => {
                        if let Some(entry) = granted.get_mut(&key)
                            && entry.1 == epoch
                        {
                            entry.2 = true;
                        }
                        pending_releases.push(key);
                    }
                    Effect::Push {
                        event: LeaseEvent::LeaseLost { key, epoch, .. },
                        ..
                    } => {
                        if let Some(entry) = granted.get_mut(&key)
                            && entry.1 == epoch
                        {
                            entry.2 = true;
                        }
                    }
                    Effect::Answer {
                        conn,
                        request_id,
                        result,
                    } => {
                        assert!(
                            answered.insert((conn, request_id)),
                            "seed {seed}: request {request_id} answered twice"
                        );
                        if let Ok(grant) = result {
                            let key = key_of_epoch
                                .get(&grant.lease.epoch)
                                .cloned()
                                .expect("the answered grant's profile");
                            if let Some((previous, epoch, ended)) = granted.get(&key) {
                                assert!(
                                    *ended,
                                    "seed {seed}: {key} granted to {} while {previous} still held epoch {epoch}",
                                    grant.lease.session
                                );
                                assert!(grant.lease.epoch > *epoch, "seed {seed}: epochs rise");
                            }
                            granted.insert(key, (grant.lease.session, grant.lease.epoch, false));
                        }
                    }
                    Effect::Push { .. } | Effect::Kick { .. } | Effect::Taken { .. } => {}
                }
            }
        }
    }
}
