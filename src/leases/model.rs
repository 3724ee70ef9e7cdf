//! A reference model of the lease rules, and a property test that holds the
//! [`LeaseTable`] to it.
//!
//! The model is the rules of DESIGN.md section 3 ("Loading" and "Sessions
//! and liveness") written down as plainly as possible. Each profile has a
//! holder (a session and its epoch) or none, a list of waiting loads, and the
//! time by which a heading ForceLoad stops waiting for a holder it has asked
//! to release. Each session has a connection or none, and the end of its
//! resume grace while it is away. After every operation the model re-applies
//! the loading rules to every profile until nothing changes, and timers are
//! found by scanning the state for deadlines that have passed. There are no
//! indexes, generations, tickets or in-flight writes to keep in step, so it
//! can be checked against DESIGN.md by reading it.
//!
//! Both sides use instant storage: the test drives the table through a
//! harness that completes every [`Effect::Grant`] and [`Effect::Release`] as
//! soon as it appears, and the grant of a hand-over right after the release
//! it was written with, giving each grant the profile's next epoch as
//! storage would. Like the driver, the harness wakes at each timer's own time; timers
//! due at the same instant fire together, and the writes they start finish
//! after all of them, which the model copies. Random sequences of connects,
//! disconnects, loads, releases, revocations and the passage of time then go
//! to both, and after every step the answers, pushed events, kicks, daemon
//! releases, resumed leases, holders, queue lengths and session counts must
//! be identical. The table's output is also checked on its own: each profile
//! has at most one holder, epochs rise per profile, and a profile is granted
//! again only after its previous holder released it, was told it lost it, or
//! went away.
//!
//! Where DESIGN.md leaves a detail open, the model follows the table's
//! documented choice and says so: ForceLoads and Steals go ahead of Repeats,
//! a Steal supersedes waiting ForceLoads too, a ForceLoad that replaces an
//! older one inherits the release request already sent and its deadline, and
//! a disconnected holder keeps its lease until its resume grace ends (or it
//! comes back after the ForceLoad's patience is spent) unless the rules say
//! to take it at once.

use std::collections::BTreeMap;
use std::time::Duration;

use profiled_protocol::{LoadPolicy, LossReason, SessionId};
use proptest::prelude::*;
use tokio::time::Instant;

use super::table::{
    ConnId, Effect, HandOver, LeaseEvent, LeaseRules, LeaseTable, LoadError, LoadRequest,
};
use crate::ProfileKey;
use crate::storage::{Granted, LeaseRecord, MetaRecord};

/// How many sessions and profiles the tests use.
const SESSIONS: usize = 3;
const KEYS: usize = 2;

/// How long a ForceLoad waits for a connected holder.
const FORCE_LOAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an away session keeps its leases.
const RESUME_GRACE: Duration = Duration::from_secs(10);

fn rules(take_disconnected_at_once: bool) -> LeaseRules {
    LeaseRules {
        force_load_timeout: FORCE_LOAD_TIMEOUT,
        resume_grace: RESUME_GRACE,
        take_disconnected_at_once,
        max_leases_per_session: usize::MAX,
    }
}

fn key_name(index: usize) -> ProfileKey {
    ProfileKey::new("PlayerData", format!("k{index}"))
}

fn session_name(index: usize) -> SessionId {
    SessionId {
        place_id: 1,
        job_id: format!("s{index}"),
    }
}

/// Why a lease was lost, in a form that can be sorted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Loss {
    Stolen,
    ForceLoadTimeout,
    Overwritten,
    Wiped,
    Revoked,
    Unknown(u32),
}

impl From<LossReason> for Loss {
    fn from(reason: LossReason) -> Self {
        match reason {
            LossReason::Stolen => Self::Stolen,
            LossReason::ForceLoadTimeout => Self::ForceLoadTimeout,
            LossReason::Overwritten => Self::Overwritten,
            LossReason::Wiped => Self::Wiped,
            LossReason::Revoked => Self::Revoked,
            // The daemon never sends a reason it does not know, and a
            // reason added to the protocol crate lands here until it is
            // listed (the enum is non-exhaustive); either would show in a
            // model run's outcomes.
            LossReason::Unknown(index) => Self::Unknown(index),
            _ => Self::Unknown(u32::MAX),
        }
    }
}

/// How a load ended. Profiles and sessions are named by their index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Granted {
        epoch: u64,
    },
    AlreadyLoaded {
        key: usize,
    },
    Taken {
        key: usize,
        owner: usize,
    },
    Superseded {
        key: usize,
    },
    Timeout {
        key: usize,
    },
    /// Anything these tests never provoke, such as a storage error.
    Unexpected(String),
}

/// Something a client or the daemon's storage would see.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Obs {
    Answer {
        conn: ConnId,
        request_id: u64,
        outcome: Outcome,
    },
    ReleaseRequested {
        conn: ConnId,
        key: usize,
        epoch: u64,
        requester: usize,
    },
    LeaseLost {
        conn: ConnId,
        key: usize,
        epoch: u64,
        reason: Loss,
        new_owner: Option<usize>,
    },
    /// Any other pushed event; none is expected.
    OtherEvent {
        conn: ConnId,
        event: String,
    },
    Kick {
        conn: ConnId,
    },
    /// The daemon released a lease whose holder stayed away.
    DaemonRelease {
        key: usize,
        epoch: u64,
    },
}

/// A deadline, ordered by time and then by when it was set, which is the
/// order in which the table's timers fire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    at: Instant,
    seq: u64,
}

#[derive(Clone, Debug)]
struct ModelWaiter {
    conn: ConnId,
    session: usize,
    request_id: u64,
    policy: LoadPolicy,
    deadline: Option<Due>,
}

#[derive(Clone, Debug, Default)]
struct ModelKey {
    /// The holding session and its epoch.
    holder: Option<(usize, u64)>,
    /// The last epoch granted, as storage keeps it.
    last_epoch: u64,
    /// Waiting loads, the next to be served first.
    queue: Vec<ModelWaiter>,
    /// When the holder, already asked to release for the ForceLoad heading
    /// the queue, loses the lease anyway.
    asked: Option<Due>,
    /// Set while the daemon's release of the lease is being written.
    releasing: bool,
}

#[derive(Clone, Debug, Default)]
struct ModelSession {
    /// The session's connection, `None` while it is away.
    conn: Option<ConnId>,
    /// While it is away and holds leases: when its resume grace ends.
    grace_ends: Option<Due>,
}

/// A timer that has come due in the model.
#[derive(Clone, Copy, Debug)]
enum Fired {
    Deadline {
        key: usize,
        conn: ConnId,
        request_id: u64,
    },
    /// A ForceLoad's patience with a connected holder is spent.
    Force,
    Grace {
        session: usize,
    },
}

/// The reference model.
#[derive(Debug)]
struct Model {
    rules: LeaseRules,
    keys: Vec<ModelKey>,
    sessions: Vec<ModelSession>,
    /// Live connections and their sessions.
    conns: BTreeMap<ConnId, usize>,
    /// Orders deadlines set at the same instant.
    seq: u64,
    out: Vec<Obs>,
}

impl Model {
    fn new(rules: LeaseRules) -> Self {
        Self {
            rules,
            keys: vec![ModelKey::default(); KEYS],
            sessions: vec![ModelSession::default(); SESSIONS],
            conns: BTreeMap::new(),
            seq: 0,
            out: Vec::new(),
        }
    }

    fn due(&mut self, at: Instant) -> Due {
        self.seq += 1;
        Due { at, seq: self.seq }
    }

    fn held_by(&self, session: usize) -> Vec<(usize, u64)> {
        (0..KEYS)
            .filter_map(|key| match self.keys[key].holder {
                Some((holder, epoch)) if holder == session => Some((key, epoch)),
                _ => None,
            })
            .collect()
    }

    /// Removes every wait of a connection that has gone. Nobody is left to
    /// answer.
    fn drop_waits(&mut self, conn: ConnId) {
        for key in &mut self.keys {
            key.queue.retain(|waiter| waiter.conn != conn);
        }
    }

    /// A session connects. A connection it already had is closed, and the
    /// leases it holds are resumed with their epochs.
    fn connect(&mut self, conn: ConnId, session: usize, now: Instant) -> Vec<(usize, u64)> {
        let old = self.sessions[session].conn.replace(conn);
        self.sessions[session].grace_ends = None;
        self.conns.insert(conn, session);
        if let Some(old) = old {
            self.conns.remove(&old);
            self.drop_waits(old);
            self.out.push(Obs::Kick { conn: old });
        }
        let leases = self.held_by(session);
        self.settle(now);
        leases
    }

    /// A connection drops: its waits end, and its session keeps its leases
    /// for the resume grace.
    fn disconnect(&mut self, conn: ConnId, now: Instant) {
        let Some(session) = self.conns.remove(&conn) else {
            return;
        };
        self.drop_waits(conn);
        if self.sessions[session].conn == Some(conn) {
            self.sessions[session].conn = None;
            if !self.held_by(session).is_empty() {
                let due = self.due(now + self.rules.resume_grace);
                self.sessions[session].grace_ends = Some(due);
            }
        }
        self.settle(now);
    }

    /// A load arrives on a live connection.
    fn load(&mut self, request: &LoadRequest, key: usize, now: Instant) {
        let Some(&session) = self.conns.get(&request.conn) else {
            return;
        };
        let answer = |outcome| Obs::Answer {
            conn: request.conn,
            request_id: request.request_id,
            outcome,
        };
        let state = &self.keys[key];
        let holder = state.holder.map(|(holder, _)| holder);
        if holder == Some(session) || state.queue.iter().any(|w| w.session == session) {
            self.out.push(answer(Outcome::AlreadyLoaded { key }));
            return;
        }
        if request.policy == LoadPolicy::Cancel
            && let Some(owner) = holder
        {
            self.out.push(answer(Outcome::Taken { key, owner }));
            return;
        }
        if matches!(request.policy, LoadPolicy::ForceLoad | LoadPolicy::Steal) {
            // The newest force load wins.
            let (superseded, kept) = std::mem::take(&mut self.keys[key].queue)
                .into_iter()
                .partition(|w| w.policy == LoadPolicy::ForceLoad);
            self.keys[key].queue = kept;
            for old in superseded {
                self.out.push(Obs::Answer {
                    conn: old.conn,
                    request_id: old.request_id,
                    outcome: Outcome::Superseded { key },
                });
            }
        }
        let deadline = request.deadline.map(|at| self.due(at));
        let waiter = ModelWaiter {
            conn: request.conn,
            session,
            request_id: request.request_id,
            policy: request.policy,
            deadline,
        };
        let queue = &mut self.keys[key].queue;
        match request.policy {
            LoadPolicy::Steal => queue.insert(0, waiter),
            LoadPolicy::ForceLoad => {
                let at = queue
                    .iter()
                    .position(|w| w.policy != LoadPolicy::Steal)
                    .unwrap_or(queue.len());
                queue.insert(at, waiter);
            }
            LoadPolicy::Repeat | LoadPolicy::Cancel => queue.push(waiter),
        }
        self.settle(now);
    }

    /// The holder of `key` released it under `epoch`.
    fn released(&mut self, key: usize, epoch: u64, now: Instant) {
        if self.keys[key].holder.is_some_and(|(_, e)| e == epoch) {
            self.keys[key].holder = None;
            self.settle(now);
        }
    }

    /// An admin's action ended the lease `epoch` on `key`.
    fn revoked(&mut self, key: usize, epoch: u64, reason: LossReason, now: Instant) {
        if let Some((holder, held)) = self.keys[key].holder
            && held == epoch
        {
            self.keys[key].holder = None;
            if let Some(conn) = self.sessions[holder].conn {
                self.out.push(Obs::LeaseLost {
                    conn,
                    key,
                    epoch,
                    reason: reason.into(),
                    new_owner: None,
                });
            }
            self.settle(now);
        }
    }

    /// Time passes to `now`. The deadlines that came due take effect at
    /// their own times, the earliest first. Deadlines due at the same
    /// instant fire together, as the table's timers do, so a release the
    /// daemon starts among them is written only after all of them.
    fn advance(&mut self, now: Instant) {
        while let Some((first, _)) = self.next_due(now) {
            let at = first.at;
            while let Some((_, fired)) = self.next_due(at) {
                match fired {
                    Fired::Deadline {
                        key,
                        conn,
                        request_id,
                    } => {
                        self.keys[key]
                            .queue
                            .retain(|w| (w.conn, w.request_id) != (conn, request_id));
                        self.out.push(Obs::Answer {
                            conn,
                            request_id,
                            outcome: Outcome::Timeout { key },
                        });
                    }
                    // Taking the lease is the loading rules' business.
                    Fired::Force => {}
                    Fired::Grace { session } => {
                        self.sessions[session].grace_ends = None;
                        for (key, epoch) in self.held_by(session) {
                            self.keys[key].holder = None;
                            self.keys[key].releasing = true;
                            self.out.push(Obs::DaemonRelease { key, epoch });
                        }
                    }
                }
                self.settle(at);
            }
            for key in &mut self.keys {
                key.releasing = false;
            }
            self.settle(at);
        }
    }

    /// The earliest deadline at or before `now` that still matters.
    fn next_due(&self, now: Instant) -> Option<(Due, Fired)> {
        let mut found: Vec<(Due, Fired)> = Vec::new();
        for (index, state) in self.keys.iter().enumerate() {
            for waiter in &state.queue {
                if let Some(due) = waiter.deadline {
                    found.push((
                        due,
                        Fired::Deadline {
                            key: index,
                            conn: waiter.conn,
                            request_id: waiter.request_id,
                        },
                    ));
                }
            }
            // A spent ForceLoad matters only while its holder can be told.
            let holder_connected = state
                .holder
                .is_some_and(|(holder, _)| self.sessions[holder].conn.is_some());
            if let Some(due) = state.asked
                && holder_connected
            {
                found.push((due, Fired::Force));
            }
        }
        for (index, session) in self.sessions.iter().enumerate() {
            if let Some(due) = session.grace_ends
                && session.conn.is_none()
            {
                found.push((due, Fired::Grace { session: index }));
            }
        }
        found
            .into_iter()
            .filter(|(due, _)| due.at <= now)
            .min_by_key(|(due, _)| *due)
    }

    /// Applies the loading rules to every profile until nothing changes.
    fn settle(&mut self, now: Instant) {
        for key in 0..KEYS {
            while self.step(key, now) {}
        }
    }

    /// Applies the loading rules to one profile once. Returns whether the
    /// lease changed hands.
    fn step(&mut self, key: usize, now: Instant) -> bool {
        if self.keys[key].releasing {
            return false;
        }
        let Some(head) = self.keys[key].queue.first().cloned() else {
            self.keys[key].asked = None;
            return false;
        };
        if head.policy != LoadPolicy::ForceLoad {
            self.keys[key].asked = None;
        }
        let Some((holder, epoch)) = self.keys[key].holder else {
            // A free profile goes to the head of the queue.
            self.grant_head(key, None);
            return true;
        };
        match head.policy {
            LoadPolicy::Steal => {
                self.grant_head(key, Some(LossReason::Stolen));
                true
            }
            LoadPolicy::ForceLoad => match (self.sessions[holder].conn, self.keys[key].asked) {
                (None, _) if self.rules.take_disconnected_at_once => {
                    self.grant_head(key, Some(LossReason::ForceLoadTimeout));
                    true
                }
                // Nobody can answer a release request; the lease frees when
                // the holder's resume grace ends.
                (None, _) => false,
                (Some(conn), None) => {
                    let due = self.due(now + self.rules.force_load_timeout);
                    self.keys[key].asked = Some(due);
                    self.out.push(Obs::ReleaseRequested {
                        conn,
                        key,
                        epoch,
                        requester: head.session,
                    });
                    false
                }
                (Some(_), Some(due)) if now >= due.at => {
                    self.grant_head(key, Some(LossReason::ForceLoadTimeout));
                    true
                }
                (Some(_), Some(_)) => false,
            },
            // Repeat (and a Cancel that found the profile free) waits.
            LoadPolicy::Repeat | LoadPolicy::Cancel => false,
        }
    }

    /// Grants `key` to the head of its queue with the next epoch. A holder it
    /// is taken from hears why, if it is connected.
    fn grant_head(&mut self, key: usize, reason: Option<LossReason>) {
        let state = &mut self.keys[key];
        let waiter = state.queue.remove(0);
        state.last_epoch += 1;
        let epoch = state.last_epoch;
        let previous = state.holder.replace((waiter.session, epoch));
        state.asked = None;
        if let (Some((previous, lost)), Some(reason)) = (previous, reason)
            && let Some(conn) = self.sessions[previous].conn
        {
            self.out.push(Obs::LeaseLost {
                conn,
                key,
                epoch: lost,
                reason: reason.into(),
                new_owner: Some(waiter.session),
            });
        }
        self.out.push(Obs::Answer {
            conn: waiter.conn,
            request_id: waiter.request_id,
            outcome: Outcome::Granted { epoch },
        });
    }

    fn queued(&self) -> usize {
        self.keys.iter().map(|key| key.queue.len()).sum()
    }

    fn session_count(&self) -> usize {
        (0..SESSIONS)
            .filter(|&s| self.sessions[s].conn.is_some() || !self.held_by(s).is_empty())
            .count()
    }
}

/// The real table behind a harness that completes storage writes at once.
#[derive(Debug)]
struct Harness {
    table: LeaseTable,
    keys: Vec<ProfileKey>,
    sessions: Vec<SessionId>,
    /// The last epoch storage granted for each profile.
    stored_epoch: Vec<u64>,
}

impl Harness {
    fn new(rules: LeaseRules) -> Self {
        Self {
            table: LeaseTable::new(rules),
            keys: (0..KEYS).map(key_name).collect(),
            sessions: (0..SESSIONS).map(session_name).collect(),
            stored_epoch: vec![0; KEYS],
        }
    }

    fn key_index(&self, key: &ProfileKey) -> usize {
        self.keys
            .iter()
            .position(|k| k == key)
            .expect("the table only names profiles it was given")
    }

    fn session_index(&self, session: &SessionId) -> usize {
        self.sessions
            .iter()
            .position(|s| s == session)
            .expect("the table only names sessions it was given")
    }

    /// Completes a grant as storage would, with the profile's next epoch.
    fn grant(&mut self, key: &ProfileKey, ticket: u64, owner: SessionId, now: Instant) {
        let index = self.key_index(key);
        self.stored_epoch[index] += 1;
        let granted = Granted {
            lease: LeaseRecord {
                session: owner,
                epoch: self.stored_epoch[index],
                since_ms: 0,
                uid: None,
            },
            meta: MetaRecord::default(),
            data: None,
            messages: Vec::new(),
        };
        self.table.grant_done(key, ticket, Ok(granted), now);
    }

    /// Carries out the table's effects until none are left, completing
    /// every grant and release at once, and returns what was observed in
    /// the order the table produced it.
    fn settle(&mut self, now: Instant) -> Vec<Obs> {
        let mut seen = Vec::new();
        loop {
            let effects = self.table.take_effects();
            if effects.is_empty() {
                return seen;
            }
            for effect in effects {
                match effect {
                    Effect::Grant { key, ticket, owner } => {
                        self.grant(&key, ticket, owner, now);
                    }
                    Effect::Release { key, epoch, .. } => {
                        seen.push(Obs::DaemonRelease {
                            key: self.key_index(&key),
                            epoch,
                        });
                        self.table.release_done(&key, now);
                    }
                    Effect::Answer {
                        conn,
                        request_id,
                        result,
                    } => {
                        let outcome = self.outcome(result);
                        seen.push(Obs::Answer {
                            conn,
                            request_id,
                            outcome,
                        });
                    }
                    Effect::Push { conn, event } => seen.push(self.event(conn, event)),
                    Effect::Kick { conn } => seen.push(Obs::Kick { conn }),
                    // Only counted by the driver.
                    Effect::Taken { .. } => {}
                }
            }
        }
    }

    fn outcome(&self, result: Result<Granted, LoadError>) -> Outcome {
        match result {
            Ok(granted) => Outcome::Granted {
                epoch: granted.lease.epoch,
            },
            Err(LoadError::AlreadyLoaded(key)) => Outcome::AlreadyLoaded {
                key: self.key_index(&key),
            },
            Err(LoadError::Taken { key, owner }) => Outcome::Taken {
                key: self.key_index(&key),
                owner: self.session_index(&owner),
            },
            Err(LoadError::Superseded(key)) => Outcome::Superseded {
                key: self.key_index(&key),
            },
            Err(LoadError::Timeout(key)) => Outcome::Timeout {
                key: self.key_index(&key),
            },
            Err(err) => Outcome::Unexpected(format!("{err:?}")),
        }
    }

    fn event(&self, conn: ConnId, event: LeaseEvent) -> Obs {
        match event {
            LeaseEvent::ReleaseRequested {
                key,
                epoch,
                requester,
            } => Obs::ReleaseRequested {
                conn,
                key: self.key_index(&key),
                epoch,
                requester: self.session_index(&requester),
            },
            LeaseEvent::LeaseLost {
                key,
                epoch,
                reason,
                new_owner,
            } => Obs::LeaseLost {
                conn,
                key: self.key_index(&key),
                epoch,
                reason: reason.into(),
                new_owner: new_owner.map(|owner| self.session_index(&owner)),
            },
            other => Obs::OtherEvent {
                conn,
                event: format!("{other:?}"),
            },
        }
    }

    fn holder(&self, key: usize) -> Option<(usize, u64)> {
        self.table
            .holder(&self.keys[key])
            .map(|(session, epoch)| (self.session_index(session), epoch))
    }
}

/// One step of a test.
#[derive(Clone, Debug)]
enum Op {
    /// A session connects on a new connection, replacing any it had.
    Connect { session: usize },
    /// A connection drops. It is picked from every connection made so far,
    /// so it may be one that is already gone.
    Disconnect { pick: usize },
    /// A connected session loads a profile, waiting at most `wait` seconds
    /// and a half. The half second keeps a waiter's own deadline from
    /// falling at the very instant a ForceLoad's patience or a resume grace
    /// ends, where either order would be right and the table's depends on
    /// when its timers were armed.
    Load {
        session: usize,
        key: usize,
        policy: LoadPolicy,
        wait: Option<u64>,
    },
    /// The holder of a profile releases it, if it is connected. A stale
    /// release names the epoch before the current one.
    Release { key: usize, stale: bool },
    /// An admin's action ends the lease on a profile, if it is held. A stale
    /// one names the epoch before the current one.
    Revoke {
        key: usize,
        reason: LossReason,
        stale: bool,
    },
    /// Time passes and the timers that came due fire.
    Advance { secs: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    let policy = prop_oneof![
        Just(LoadPolicy::ForceLoad),
        Just(LoadPolicy::Steal),
        Just(LoadPolicy::Repeat),
        Just(LoadPolicy::Cancel),
    ];
    let reason = prop_oneof![
        Just(LossReason::Revoked),
        Just(LossReason::Wiped),
        Just(LossReason::Overwritten),
    ];
    prop_oneof![
        2 => (0..SESSIONS).prop_map(|session| Op::Connect { session }),
        2 => (0..8usize).prop_map(|pick| Op::Disconnect { pick }),
        6 => (0..SESSIONS, 0..KEYS, policy, proptest::option::of(0..12u64)).prop_map(
            |(session, key, policy, wait)| Op::Load {
                session,
                key,
                policy,
                wait,
            }
        ),
        3 => (0..KEYS, proptest::bool::weighted(0.15))
            .prop_map(|(key, stale)| Op::Release { key, stale }),
        1 => (0..KEYS, reason, proptest::bool::weighted(0.2))
            .prop_map(|(key, reason, stale)| Op::Revoke { key, reason, stale }),
        4 => (0..7u64).prop_map(|secs| Op::Advance { secs }),
    ]
}

/// What the clients have been told about each profile's lease, built from
/// the table's observations alone.
#[derive(Debug, Default)]
struct ClientView {
    /// The last grant of each profile: the session, the epoch, and whether
    /// that grant has ended as far as its holder knows.
    granted: [Option<(usize, u64, bool)>; KEYS],
}

impl ClientView {
    fn end(&mut self, key: usize, epoch: u64) {
        if let Some((_, held, ended)) = &mut self.granted[key]
            && *held == epoch
        {
            *ended = true;
        }
    }

    /// A session that goes away can use none of its leases until a new
    /// connection lists them as resumed.
    fn away(&mut self, session: usize) {
        for (holder, _, ended) in self.granted.iter_mut().flatten() {
            if *holder == session {
                *ended = true;
            }
        }
    }

    fn resumed(&mut self, session: usize, leases: &[(usize, u64)]) {
        for &(key, epoch) in leases {
            if let Some((holder, held, ended)) = &mut self.granted[key]
                && *holder == session
                && *held == epoch
            {
                *ended = false;
            }
        }
    }

    /// Checks a grant: it must carry a higher epoch than the last, and the
    /// last holder must no longer think it holds the profile.
    fn grant(&mut self, key: usize, session: usize, epoch: u64) -> Result<(), TestCaseError> {
        if let Some((previous, held, ended)) = self.granted[key] {
            prop_assert!(
                ended,
                "k{key} granted to s{session} while s{previous} still holds epoch {held}"
            );
            prop_assert!(epoch > held, "k{key}: epoch {epoch} after {held}");
        }
        self.granted[key] = Some((session, epoch, false));
        Ok(())
    }
}

/// Runs `ops` against the table and the model and compares them after
/// every step.
fn check(ops: &[Op], take_disconnected_at_once: bool) -> Result<(), TestCaseError> {
    let rules = rules(take_disconnected_at_once);
    let mut real = Harness::new(rules);
    let mut model = Model::new(rules);
    let mut view = ClientView::default();
    let mut now = Instant::now();
    let mut conns: Vec<(ConnId, usize)> = Vec::new();
    let mut current: [Option<ConnId>; SESSIONS] = [None; SESSIONS];
    // Which profile and session each request was for.
    let mut requests: BTreeMap<(ConnId, u64), (usize, usize)> = BTreeMap::new();
    let mut next_request = 0u64;

    // Every session starts connected.
    let start = (0..SESSIONS).map(|session| Op::Connect { session });
    for (step, op) in start.chain(ops.iter().cloned()).enumerate() {
        let mut seen = Vec::new();
        match op {
            Op::Connect { session } => {
                let conn = ConnId::try_from(conns.len() + 1).expect("few connections");
                conns.push((conn, session));
                current[session] = Some(conn);
                let connected = real.table.connect(conn, session_name(session), now);
                let mut leases: Vec<(usize, u64)> = connected
                    .leases
                    .iter()
                    .map(|(key, epoch)| (real.key_index(key), *epoch))
                    .collect();
                leases.sort_unstable();
                let expected = model.connect(conn, session, now);
                prop_assert_eq!(&leases, &expected, "step {}: resumed leases", step);
                view.resumed(session, &leases);
            }
            Op::Disconnect { pick } => {
                if !conns.is_empty() {
                    let (conn, session) = conns[pick % conns.len()];
                    real.table.disconnect(conn, now);
                    model.disconnect(conn, now);
                    if current[session] == Some(conn) {
                        current[session] = None;
                        view.away(session);
                    }
                }
            }
            Op::Load {
                session,
                key,
                policy,
                wait,
            } => {
                if let Some(conn) = current[session] {
                    next_request += 1;
                    requests.insert((conn, next_request), (key, session));
                    let request = LoadRequest {
                        conn,
                        request_id: next_request,
                        key: key_name(key),
                        policy,
                        deadline: wait.map(|secs| now + Duration::from_millis(secs * 1000 + 500)),
                    };
                    real.table.load(request.clone(), now);
                    model.load(&request, key, now);
                }
            }
            Op::Release { key, stale } => {
                if let Some((holder, epoch)) = model.keys[key].holder
                    && current[holder].is_some()
                {
                    let epoch = if stale { epoch - 1 } else { epoch };
                    // As the driver does: the table hears of the release
                    // before it is written, which may start a waiter's
                    // grant to write with it, then of its success, then of
                    // that grant.
                    let hand_over =
                        real.table
                            .releasing(&key_name(key), &session_name(holder), epoch);
                    real.table.released(&key_name(key), epoch, now);
                    if let Some(HandOver { ticket, next }) = hand_over {
                        real.grant(&key_name(key), ticket, next, now);
                    }
                    model.released(key, epoch, now);
                    view.end(key, epoch);
                }
            }
            Op::Revoke { key, reason, stale } => {
                if let Some((_, epoch)) = model.keys[key].holder {
                    let epoch = if stale { epoch - 1 } else { epoch };
                    real.table.revoked(&key_name(key), epoch, reason, now);
                    model.revoked(key, epoch, reason, now);
                }
            }
            Op::Advance { secs } => {
                // Like the driver, the harness wakes at each timer's own
                // time and finishes the writes it starts before sleeping on.
                let target = now + Duration::from_secs(secs);
                while let Some(at) = real.table.next_timer()
                    && at <= target
                {
                    real.table.fire_timers(at);
                    seen.extend(real.settle(at));
                }
                now = target;
                model.advance(now);
            }
        }
        seen.extend(real.settle(now));

        // The clients' invariants, on the table's output in its own order.
        for obs in &seen {
            match *obs {
                Obs::Answer {
                    conn,
                    request_id,
                    outcome: Outcome::Granted { epoch },
                } => {
                    let &(key, session) = requests
                        .get(&(conn, request_id))
                        .expect("answers go to requests that were made");
                    view.grant(key, session, epoch)?;
                }
                Obs::LeaseLost { key, epoch, .. } | Obs::DaemonRelease { key, epoch } => {
                    view.end(key, epoch);
                }
                _ => {}
            }
        }

        // The same observations as the model's. Their order across
        // profiles follows the table's hash maps, so both are sorted.
        seen.sort();
        let mut expected = std::mem::take(&mut model.out);
        expected.sort();
        prop_assert_eq!(&seen, &expected, "step {}", step);

        // The same holders, each listed under exactly one session.
        let summaries = real.table.sessions();
        for key in 0..KEYS {
            let holder = real.holder(key);
            prop_assert_eq!(holder, model.keys[key].holder, "step {}: k{}", step, key);
            let listed: Vec<(usize, u64)> = summaries
                .iter()
                .flat_map(|summary| {
                    let session = real.session_index(&summary.session);
                    summary
                        .leases
                        .iter()
                        .filter(|(k, _)| *k == real.keys[key])
                        .map(move |(_, epoch)| (session, *epoch))
                })
                .collect();
            prop_assert_eq!(listed, holder.into_iter().collect::<Vec<_>>());
        }
        prop_assert_eq!(real.table.queued(), model.queued(), "step {}", step);
        prop_assert_eq!(
            real.table.session_count(),
            model.session_count(),
            "step {}",
            step
        );
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2000,
        // A shrunk failure is reported, not written next to the source.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_table_follows_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        check(&ops, false)?;
    }

    #[test]
    fn the_table_follows_the_model_taking_absent_holders_at_once(
        ops in proptest::collection::vec(op(), 1..40)
    ) {
        check(&ops, true)?;
    }
}
