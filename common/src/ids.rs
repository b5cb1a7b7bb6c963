//! Identifier types. Each validates when it is deserialised, with one rule per kind, so an id
//! that reaches a handler is always safe as a NATS subject token and a KV key (escaped with
//! [`crate::token::escape`] where it may hold `:` `@` `+` `=`), and an invalid id is a
//! `400 invalid_input` naming the field before any store is touched.
//!
//! The rules:
//! - names chosen by callers ([`ConversationId`], [`AgentKey`], [`WorkerId`], [`ConsumerUserId`],
//!   [`CompanyId`]): 1–256 bytes of ASCII letters, digits and `_ - : @ + =`;
//! - ids the system mints ([`MessageId`], [`StorageId`], [`LeaseId`]): 1–128 bytes of ASCII
//!   letters, digits, `_` and `-`;
//! - [`SnapshotId`]: `<escaped conversation token>.s<suffix>` as `prepareDataSnapshotUpload`
//!   mints them;
//! - [`SecretRef`]: dot-separated segments of the name alphabet (`telegram.botToken.support`);
//! - [`SkillSlug`]: the original's slug rule (spec §3.19.2) on the trimmed, lower-cased value.

use std::borrow::Borrow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator};

/// What an id of one kind may look like.
#[derive(Debug, Clone, Copy)]
struct Rule {
    max_bytes: usize,
    pattern: &'static str,
    check: fn(&str) -> bool,
    explain: &'static str,
    /// Applied before the check: slugs are compared trimmed and lower-cased, as the original
    /// did; other ids are taken as given.
    normalise: fn(String) -> String,
}

fn as_given(value: String) -> String {
    value
}

fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_-:@+=".contains(&b)
}

fn minted_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

const NAME: Rule = Rule {
    max_bytes: 256,
    pattern: "^[A-Za-z0-9_:@+=-]{1,256}$",
    check: |s| s.bytes().all(name_byte),
    explain: "1-256 characters from A-Z a-z 0-9 _ - : @ + =",
    normalise: as_given,
};

const MINTED: Rule = Rule {
    max_bytes: 128,
    pattern: "^[A-Za-z0-9_-]{1,128}$",
    check: |s| s.bytes().all(minted_byte),
    explain: "1-128 characters from A-Z a-z 0-9 _ -",
    normalise: as_given,
};

const SNAPSHOT: Rule = Rule {
    max_bytes: 1024,
    pattern: "^[A-Za-z0-9_=-]+\\.s[A-Za-z0-9_-]+$",
    check: |s| match s.split_once('.') {
        Some((token, suffix)) => {
            !token.is_empty()
                && token.bytes().all(|b| minted_byte(b) || b == b'=')
                && suffix.len() > 1
                && suffix.starts_with('s')
                && suffix.bytes().all(minted_byte)
        }
        None => false,
    },
    explain: "a snapshot id as prepareDataSnapshotUpload returns it (<conversation token>.s<id>)",
    normalise: as_given,
};

const SECRET_REF: Rule = Rule {
    max_bytes: 256,
    pattern: "^[A-Za-z0-9_:@+=-]+(\\.[A-Za-z0-9_:@+=-]+)*$",
    check: |s| s.split('.').all(|segment| !segment.is_empty() && segment.bytes().all(name_byte)),
    explain: "dot-separated names from A-Z a-z 0-9 _ - : @ + = (at most 256 characters)",
    normalise: as_given,
};

const SLUG: Rule = Rule {
    max_bytes: 128,
    pattern: "^[a-z0-9][a-z0-9_-]{1,127}$",
    check: crate::skills::is_valid_slug,
    explain: "2-128 characters from a-z 0-9 - _, starting with a letter or digit",
    normalise: |s| s.trim().to_lowercase(),
};

const BOT: Rule = Rule {
    max_bytes: 20,
    pattern: "^[0-9]{1,20}$",
    check: |s| s.bytes().all(|b| b.is_ascii_digit()),
    explain: "a Telegram bot id: 1-20 digits",
    normalise: |s| s.trim().to_string(),
};

const TELEGRAM: Rule = Rule {
    max_bytes: 21,
    pattern: "^-?[0-9]{1,20}$",
    check: |s| {
        let digits = s.strip_prefix('-').unwrap_or(s);
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
    },
    explain: "a Telegram user or chat id: digits, optionally after a '-'",
    normalise: |s| s.trim().to_string(),
};

const PAIRING: Rule = Rule {
    max_bytes: 128,
    pattern: "^[A-Za-z0-9_-]{4,128}$",
    check: |s| s.len() >= 4 && s.bytes().all(minted_byte),
    explain: "4-128 characters from A-Z a-z 0-9 _ -",
    normalise: |s| s.trim().to_string(),
};

impl Rule {
    fn validate(&self, kind: &str, value: &str) -> Result<(), String> {
        if value.is_empty() || value.len() > self.max_bytes || !(self.check)(value) {
            // The value itself is not echoed: it may be 5 KB of anything.
            return Err(format!("invalid {kind}: expected {}", self.explain));
        }
        Ok(())
    }
}

macro_rules! id_types {
    ($($(#[doc = $doc:literal])* $name:ident: $rule:ident, $kind:literal;)*) => {$(
        $(#[doc = $doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` by this kind's rule.
            pub fn parse(value: impl Into<String>) -> Result<Self, crate::OpError> {
                let value = ($rule.normalise)(value.into());
                $rule.validate($kind, &value).map_err(crate::OpError::invalid)?;
                Ok(Self(value))
            }

            /// An id read back from this system's own records, which hold only ids that passed
            /// this rule when they came in; it is not checked again.
            pub fn trusted(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }

            /// The id as one NATS subject token and KV key (see [`crate::token::escape`]).
            pub fn token(&self) -> String {
                crate::token::escape(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
                let value = ($rule.normalise)(String::deserialize(de)?);
                $rule.validate($kind, &value).map_err(serde::de::Error::custom)?;
                Ok(Self(value))
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                schemars::json_schema!({
                    "type": "string",
                    "minLength": 1,
                    "maxLength": $rule.max_bytes,
                    "pattern": $rule.pattern,
                    "description": format!("{} ({})", concat!($($doc),*).trim(), $rule.explain),
                })
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                self == &other.0
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl TryFrom<&str> for $name {
            type Error = crate::OpError;
            fn try_from(value: &str) -> Result<Self, crate::OpError> {
                Self::parse(value)
            }
        }

        impl TryFrom<String> for $name {
            type Error = crate::OpError;
            fn try_from(value: String) -> Result<Self, crate::OpError> {
                Self::parse(value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = crate::OpError;
            fn from_str(value: &str) -> Result<Self, crate::OpError> {
                Self::parse(value)
            }
        }
    )*};
}

id_types! {
    /// A conversation, e.g. `telegram:42` or `user-agent:support:u1`.
    ConversationId: NAME, "conversation id";
    /// An agent's key (the profile id).
    AgentKey: NAME, "agent key";
    /// A worker.
    WorkerId: NAME, "worker id";
    /// A user of the consumer app.
    ConsumerUserId: NAME, "consumer user id";
    /// A company of the consumer app.
    CompanyId: NAME, "company id";
    /// A queued message, as enqueueMessage returns it.
    MessageId: MINTED, "message id";
    /// A stored file (attachment or media upload).
    StorageId: MINTED, "storage id";
    /// A job lease, as a claim returns it.
    LeaseId: MINTED, "lease id";
    /// A workspace snapshot.
    SnapshotId: SNAPSHOT, "snapshot id";
    /// A secret's name, e.g. `telegram.botToken.support`.
    SecretRef: SECRET_REF, "secret ref";
    /// A global skill.
    SkillSlug: SLUG, "skill slug";
    /// A message template, as createMessageTemplate returns it.
    MessageTemplateId: MINTED, "message template id";
    /// A push template, as createPushTemplate returns it.
    PushTemplateId: MINTED, "push template id";
    /// A push job, as createPushJobCustom / createPushJobFromTemplate return it.
    PushJobId: MINTED, "push job id";
    /// A broadcast, as sendBroadcastToAllActiveAgents returns it.
    BroadcastId: MINTED, "broadcast id";
    /// A push template's key, unique within its company (e.g. `daily-check-in`).
    TemplateKey: NAME, "template key";
    /// A Telegram bot's numeric id, as `getMe` returns it (the original's `botIdentity`).
    BotIdentity: BOT, "bot identity";
    /// A Telegram user or chat id.
    TelegramId: TELEGRAM, "telegram id";
    /// A pairing code, as `createPairingCode` mints it.
    PairingCode: PAIRING, "pairing code";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_accepts_its_ids_and_refuses_hostile_ones() {
        for ok in ["c1", "telegram:42", "user-agent:support:u1", "a@b", "x=y+z", &"a".repeat(256)] {
            assert!(ConversationId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "*", ">", "a.>", "a.b", "a b", "a\0b", "a\nb", "é", &"a".repeat(257)] {
            let err = ConversationId::parse(bad).expect_err(bad);
            assert!(err.message.starts_with("invalid conversation id"), "{}", err.message);
        }
        assert!(MessageId::parse("0193a0b4-7c1e-7d2a-9f00-5c3b2a1d0e9f").is_ok());
        assert!(MessageId::parse("a:b").is_err());
        assert!(SnapshotId::parse("telegram=3A42.s0193a0b4-7c1e").is_ok());
        for bad in ["a.>", "a", ".s1", "a.s", "a.x1", "a.b.s1", "a.s*"] {
            assert!(SnapshotId::parse(bad).is_err(), "{bad}");
        }
        assert!(SecretRef::parse("telegram.botToken.support").is_ok());
        for bad in ["", ".", "a..b", "a.", ".a", "a.*", "a b"] {
            assert!(SecretRef::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(SkillSlug::parse(" Web-search_2 ").expect("valid"), "web-search_2");
        assert_eq!(BotIdentity::parse(" 123456 ").expect("valid"), "123456");
        for bad in ["", "-1", "12a", "1.2", &"1".repeat(21)] {
            assert!(BotIdentity::parse(bad).is_err(), "{bad}");
        }
        assert!(TelegramId::parse("-1001234").is_ok() && TelegramId::parse("42").is_ok());
        for bad in ["", "-", "4-2", "a", "1 2"] {
            assert!(TelegramId::parse(bad).is_err(), "{bad}");
        }
        assert!(PairingCode::parse("AB12CD34EF56").is_ok());
        for bad in ["abc", "a b c d", "a.bcd", &"a".repeat(129)] {
            assert!(PairingCode::parse(bad).is_err(), "{bad}");
        }
        for bad in ["", "a", "-a", "a.b", "a b", &"a".repeat(129)] {
            assert!(SkillSlug::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deserialising_validates() {
        let ok: ConversationId = serde_json::from_str(r#""c1""#).expect("valid");
        assert_eq!(ok, "c1");
        assert!(serde_json::from_str::<ConversationId>(r#""a.>""#).is_err());
        assert_eq!(serde_json::to_string(&ok).expect("serialise"), r#""c1""#);
    }
}
