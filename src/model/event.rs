//! One event, from the moment the worker claims it to its outcome, and the kinds of
//! event a user's lifecycle produces (`pg_new_user_hook.events`). Pure: no I/O.

use crate::model::names;

/// What happened to the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Created,
    Updated,
    Deleted,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Created, Kind::Updated, Kind::Deleted];

    /// As stored in the outbox (`kind`) and named in `pg_new_user_hook.events`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Created => "created",
            Kind::Updated => "updated",
            Kind::Deleted => "deleted",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// The kinds of event to capture (`pg_new_user_hook.events`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kinds {
    pub created: bool,
    pub updated: bool,
    pub deleted: bool,
}

impl Kinds {
    pub const DEFAULT: Kinds = Kinds {
        created: true,
        updated: false,
        deleted: false,
    };

    /// Whether anything after the creation is captured (updates or deletions).
    pub fn lifecycle(self) -> bool {
        self.updated || self.deleted
    }

    /// One bit per kind, in `Kind::ALL`'s order: for keeping the setting in an atomic.
    pub const fn bits(self) -> u8 {
        self.created as u8 | (self.updated as u8) << 1 | (self.deleted as u8) << 2
    }

    pub const fn from_bits(bits: u8) -> Kinds {
        Kinds {
            created: bits & 0b001 != 0,
            updated: bits & 0b010 != 0,
            deleted: bits & 0b100 != 0,
        }
    }
}

/// Parses `pg_new_user_hook.events`: a comma-separated list of `created`, `updated`,
/// `deleted`. Empty means the default (`created`).
pub fn parse_kinds(list: &str) -> Result<Kinds, String> {
    let mut bits = 0;
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let kind = Kind::from_name(&name.to_ascii_lowercase()).ok_or_else(|| {
            format!(
                "{}: \"{name}\" is not an event type; allowed: created, updated, deleted (comma-separated)",
                names::EVENTS
            )
        })?;
        bits |= 1
            << Kind::ALL
                .iter()
                .position(|k| *k == kind)
                .expect("a kind is in ALL");
    }
    Ok(if bits == 0 {
        Kinds::DEFAULT
    } else {
        Kinds::from_bits(bits)
    })
}

/// A pending event as claimed from the outbox for one delivery attempt.
#[derive(Clone, Debug)]
pub struct Event {
    /// The outbox id, sent as `webhook-id`: the same on every attempt.
    pub id: String,
    /// This attempt's number (1-based).
    pub attempt: u32,
    pub kind: Kind,
    /// The allow-listed snapshot the trigger stored (JSON): the user as committed;
    /// for a deletion, the user as it was before (never a soft delete's obfuscated values).
    pub record: String,
    /// For an update, the user before the transaction that changed it (JSON).
    pub old_record: Option<String>,
    /// `schema.table` the user was inserted into.
    pub source: String,
    /// When the change committed, RFC 3339.
    pub created_at: String,
    /// Sent while the backend is down, to learn whether it is back: not held back.
    pub probe: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_setting_accepts_any_combination_and_defaults_to_created() {
        assert_eq!(parse_kinds("").unwrap(), Kinds::DEFAULT);
        assert_eq!(parse_kinds(" , ").unwrap(), Kinds::DEFAULT);
        assert_eq!(
            parse_kinds("created, Updated,deleted").unwrap(),
            Kinds {
                created: true,
                updated: true,
                deleted: true
            }
        );
        let only_deleted = parse_kinds("deleted").unwrap();
        assert!(!only_deleted.created && !only_deleted.updated && only_deleted.deleted);
        assert!(only_deleted.lifecycle());
        assert!(!Kinds::DEFAULT.lifecycle());
    }

    #[test]
    fn a_bad_event_type_is_refused_with_the_allowed_ones() {
        let err = parse_kinds("created, signed_in").unwrap_err();
        assert!(err.contains("pg_new_user_hook.events"), "{err}");
        assert!(err.contains("\"signed_in\""), "{err}");
        assert!(err.contains("allowed: created, updated, deleted"), "{err}");
    }

    #[test]
    fn kinds_round_trip_through_their_bits() {
        for bits in 0..8 {
            assert_eq!(Kinds::from_bits(bits).bits(), bits);
        }
        let none = Kinds::from_bits(0);
        assert!(!none.created && !none.updated && !none.deleted);
        assert_eq!(Kinds::DEFAULT.bits(), 0b001);
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(Kind::from_name("inserted"), None);
    }
}
