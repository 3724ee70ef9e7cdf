//! Who may connect, and who may use the admin role.
//!
//! The socket's file mode and group are the first gate: a process that
//! cannot open the socket file cannot connect. The second is the peer's
//! credentials, which the kernel reports for every Unix socket connection
//! (`SO_PEERCRED`) and a client cannot forge: its uid, its primary gid and
//! its pid. Supplementary groups are read from `/proc/<pid>/status`. The
//! `[access]` config names the users and groups allowed each role; names are
//! resolved through `/etc/passwd` and `/etc/group` once, at start.

use std::collections::HashSet;
use std::path::Path;

use profiled_protocol::Role;

use crate::config::AccessConfig;

/// The resolved access rules.
#[derive(Clone, Debug)]
pub struct AccessPolicy {
    /// Who may connect as a game server; `None` is anyone who can open the
    /// socket.
    game: Option<Principals>,
    /// Who may connect as an admin, besides root and the daemon's own user.
    admin: Principals,
    /// The daemon's own uid, always an admin.
    own_uid: u32,
}

/// A connecting process, as the kernel vouches for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its user id.
    pub uid: u32,
    /// Its primary group id.
    pub gid: u32,
    /// Its process id, for logs; `None` if the kernel did not say.
    pub pid: Option<i32>,
    /// Its groups: the primary one, and the supplementary ones read when it
    /// connected (see [`Peer::new`]).
    pub groups: Vec<u32>,
}

/// A set of users and groups, by id.
#[derive(Clone, Debug, Default)]
struct Principals {
    users: HashSet<u32>,
    groups: HashSet<u32>,
}

/// Why the access rules could not be resolved.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct AccessError {
    /// The dotted config key.
    pub key: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl AccessPolicy {
    /// Resolves the configured names and ids.
    pub fn new(config: &AccessConfig) -> Result<Self, AccessError> {
        let game = if config.game_users.is_empty() && config.game_groups.is_empty() {
            None
        } else {
            Some(Principals {
                users: resolve(
                    &config.game_users,
                    Path::new("/etc/passwd"),
                    "access.game_users",
                )?,
                groups: resolve(
                    &config.game_groups,
                    Path::new("/etc/group"),
                    "access.game_groups",
                )?,
            })
        };
        let admin = Principals {
            users: resolve(
                &config.admin_users,
                Path::new("/etc/passwd"),
                "access.admin_users",
            )?,
            groups: resolve(
                &config.admin_groups,
                Path::new("/etc/group"),
                "access.admin_groups",
            )?,
        };
        Ok(Self {
            game,
            admin,
            own_uid: current_uid(),
        })
    }

    /// Anyone who can open the socket may connect, and root and the daemon's
    /// own user may be admins: the rules of an empty `[access]` section.
    pub fn open() -> Self {
        Self {
            game: None,
            admin: Principals::default(),
            own_uid: current_uid(),
        }
    }

    /// Whether `peer` may connect with `role`; the error says why not.
    pub fn check(&self, peer: &Peer, role: Role) -> Result<(), String> {
        let groups = &peer.groups;
        let admin =
            peer.uid == 0 || peer.uid == self.own_uid || self.admin.contains(peer.uid, groups);
        match role {
            Role::Admin if admin => Ok(()),
            Role::Admin => Err(format!("uid {} may not connect as an admin", peer.uid)),
            Role::Game => match &self.game {
                None => Ok(()),
                Some(_) if admin => Ok(()),
                Some(game) if game.contains(peer.uid, groups) => Ok(()),
                Some(_) => Err(format!("uid {} may not connect", peer.uid)),
            },
        }
    }
}

impl Peer {
    /// The peer the kernel reported for a connection. Its supplementary
    /// groups are read from `/proc/<pid>/status` at once, at accept, and
    /// trusted only if that file's real uid and gid are the kernel's: a pid
    /// recycled by another process since the connect does not lend it that
    /// process's groups.
    pub fn new(uid: u32, gid: u32, pid: Option<i32>) -> Self {
        let mut groups = vec![gid];
        if let Some(pid) = pid {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            groups.extend(supplementary_groups(&status, uid, gid));
        }
        Self {
            uid,
            gid,
            pid,
            groups,
        }
    }
}

impl Principals {
    fn contains(&self, uid: u32, groups: &[u32]) -> bool {
        self.users.contains(&uid) || groups.iter().any(|g| self.groups.contains(g))
    }
}

/// Turns names or numeric ids into ids, using the `name:x:id:` lines of
/// `database` (`/etc/passwd` or `/etc/group`).
fn resolve(
    entries: &[String],
    database: &Path,
    key: &'static str,
) -> Result<HashSet<u32>, AccessError> {
    if entries.is_empty() {
        return Ok(HashSet::new());
    }
    let text = std::fs::read_to_string(database).unwrap_or_default();
    entries
        .iter()
        .map(|entry| {
            if let Ok(id) = entry.parse::<u32>() {
                return Ok(id);
            }
            lookup(&text, entry).ok_or_else(|| AccessError {
                key,
                problem: format!("no such name {entry:?} in {}", database.display()),
            })
        })
        .collect()
}

/// The id of `name` in the text of `/etc/passwd` or `/etc/group`.
fn lookup(database: &str, name: &str) -> Option<u32> {
    database.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.next()?;
        fields.next()?.parse().ok()
    })
}

/// The `Groups:` of a `/proc/<pid>/status` text, if its real uid and gid
/// (the first value of `Uid:` and `Gid:`) are `uid` and `gid`.
fn supplementary_groups(status: &str, uid: u32, gid: u32) -> Vec<u32> {
    let first = |field: &str| {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u32>().ok())
    };
    if first("Uid:") != Some(uid) || first("Gid:") != Some(gid) {
        return Vec::new();
    }
    status
        .lines()
        .find(|l| l.starts_with("Groups:"))
        .map(|line| {
            line.trim_start_matches("Groups:")
                .split_whitespace()
                .filter_map(|g| g.parse::<u32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The daemon's own uid, from `/proc/self/status` (no unsafe `getuid`).
fn current_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|uid| uid.parse().ok())
        .unwrap_or(0)
}

/// Sets the socket file's mode and, if given, its group.
pub fn secure_socket(path: &Path, mode: u32, group: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Resolves a group name or id for the socket.
pub fn socket_group(name: &str) -> Result<u32, AccessError> {
    let ids = resolve(
        &[name.to_owned()],
        Path::new("/etc/group"),
        "access.socket_group",
    )?;
    ids.into_iter().next().ok_or(AccessError {
        key: "access.socket_group",
        problem: "empty".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\ngame:x:1001:1001::/home/game:/bin/sh\n";

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer::new(uid, gid, None)
    }

    #[test]
    fn supplementary_groups_count_only_for_the_process_that_connected() {
        let status = "Name:\tgame\nUid:\t1001\t1001\t1001\t1001\nGid:\t1001\t1001\t1001\t1001\nGroups:\t27 2000 \n";
        assert_eq!(supplementary_groups(status, 1001, 1001), [27, 2000]);
        // A recycled pid now belongs to someone else: its groups are not
        // the connecting peer's.
        assert!(supplementary_groups(status, 1002, 1002).is_empty());
        assert!(supplementary_groups("", 1001, 1001).is_empty());
    }

    #[test]
    fn names_resolve_through_the_database_text() {
        assert_eq!(lookup(PASSWD, "game"), Some(1001));
        assert_eq!(lookup(PASSWD, "root"), Some(0));
        assert_eq!(lookup(PASSWD, "nobody-here"), None);
        assert_eq!(lookup(PASSWD, "gam"), None, "whole names only");
    }

    #[test]
    fn roles_follow_the_lists_and_root_is_always_an_admin() {
        let policy = AccessPolicy {
            game: Some(Principals {
                users: HashSet::from([1001]),
                groups: HashSet::from([2000]),
            }),
            admin: Principals {
                users: HashSet::from([1500]),
                groups: HashSet::new(),
            },
            own_uid: 999,
        };
        assert!(policy.check(&peer(1001, 1001), Role::Game).is_ok());
        assert!(
            policy.check(&peer(1002, 2000), Role::Game).is_ok(),
            "by group"
        );
        assert!(policy.check(&peer(1003, 1003), Role::Game).is_err());
        assert!(policy.check(&peer(1001, 1001), Role::Admin).is_err());
        assert!(policy.check(&peer(1500, 1500), Role::Admin).is_ok());
        assert!(
            policy.check(&peer(1500, 1500), Role::Game).is_ok(),
            "admins may play"
        );
        assert!(policy.check(&peer(0, 0), Role::Admin).is_ok());
        assert!(
            policy.check(&peer(999, 999), Role::Admin).is_ok(),
            "the daemon's user"
        );
        let err = policy
            .check(&peer(1003, 1003), Role::Admin)
            .expect_err("refused");
        assert_eq!(err, "uid 1003 may not connect as an admin");
    }

    #[test]
    fn an_open_policy_lets_anyone_play_but_not_administer() {
        let policy = AccessPolicy {
            own_uid: 999,
            ..AccessPolicy::open()
        };
        assert!(policy.check(&peer(4242, 4242), Role::Game).is_ok());
        assert!(policy.check(&peer(4242, 4242), Role::Admin).is_err());
    }
}
