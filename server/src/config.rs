//! Broker settings, validated once ([`Config::validate`]) and shared by every layer.

use std::path::PathBuf;
use std::time::Duration;

/// How an acknowledged write is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Each group is written to the write-ahead log, then `fdatasync`ed: survives power loss.
    /// The default.
    Fsync,
    /// Each group is written to the write-ahead log (the OS's page cache) and not synced:
    /// survives a process crash, not a power cut.
    Flush,
}

/// Everything `taskd` can be told. [`Config::default`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the sled store lives. Defaults to `./taskd-data`.
    pub data_dir: PathBuf,
    /// Lease length of an assignment; heartbeats extend it. Defaults to 30 s.
    pub lease: Duration,
    /// Heartbeat interval suggested to workers. Defaults to 10 s.
    pub heartbeat: Duration,
    /// Grace for a disconnected worker and after a restart. Defaults to 30 s.
    pub grace: Duration,
    /// Default max attempts of a task. Defaults to 3.
    pub max_attempts: u32,
    /// Default first retry backoff. Defaults to 1 s.
    pub backoff_initial: Duration,
    /// Default backoff ceiling. Defaults to 60 s.
    pub backoff_max: Duration,
    /// Default time a terminal task is kept. Defaults to 7 days.
    pub result_ttl: Duration,
    /// Largest task payload accepted. Defaults to 4 MiB.
    pub max_payload_bytes: usize,
    /// Largest task result (success output or error details) accepted. Defaults to 4 MiB.
    pub max_result_bytes: usize,
    /// Durability of acknowledged writes. Defaults to [`SyncMode::Fsync`].
    pub sync: SyncMode,
    /// Bearer token every RPC must carry (health excepted); `None`: no check. An empty token
    /// means none (as in `taskctl` and `taskworker`), so an empty `TASKD_TOKEN` is like an
    /// unset one.
    pub token: Option<String>,
    /// Exec slots of the worker `taskd --local-workers` runs in-process (started by the
    /// binary's `main`, not by [`crate::run`]). Defaults to 0.
    pub local_workers: u32,
    /// sled page cache size in bytes. Defaults to 32 MiB: the broker reads the store only at
    /// start, the cache serves writes, and with 1M queued tasks 64 MiB cost ~170 MB more RSS
    /// for no measurable gain.
    pub cache_capacity: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./taskd-data"),
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            grace: Duration::from_secs(30),
            max_attempts: 3,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            result_ttl: Duration::from_secs(7 * 24 * 3600),
            max_payload_bytes: 4 * 1024 * 1024,
            max_result_bytes: 4 * 1024 * 1024,
            sync: SyncMode::Fsync,
            token: None,
            local_workers: 0,
            cache_capacity: 32 * 1024 * 1024,
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {reason}")]
pub struct ConfigError {
    /// The flag's name.
    pub setting: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// Longest configurable duration (365 days, as for a task's own delays and TTL): larger ones
/// would overflow the broker's clock arithmetic (`Instant + Duration` panics).
pub const MAX_CONFIGURABLE_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Largest payload or result the broker can be configured to accept (64 MiB).
pub const MAX_CONFIGURABLE_BYTES: usize = 64 * 1024 * 1024;

impl Config {
    /// Checks the invariants between settings; returns the config when they hold, with an
    /// empty token turned into `None`.
    pub fn validate(mut self) -> Result<Config, ConfigError> {
        self.token = self.token.filter(|t| !t.is_empty());
        let err = |setting, reason: &str| ConfigError {
            setting,
            reason: reason.to_string(),
        };
        for (name, v) in [
            ("--lease", self.lease),
            ("--heartbeat", self.heartbeat),
            ("--grace", self.grace),
            ("--backoff-initial", self.backoff_initial),
            ("--backoff-max", self.backoff_max),
            ("--result-ttl", self.result_ttl),
        ] {
            if v > MAX_CONFIGURABLE_DURATION {
                return Err(err(name, "must be at most 365d"));
            }
        }
        if self.lease < Duration::from_millis(100) {
            return Err(err("--lease", "must be at least 100ms"));
        }
        if self.heartbeat.is_zero() || self.heartbeat >= self.lease {
            return Err(err("--heartbeat", "must be above 0 and below --lease"));
        }
        if self.max_attempts == 0 {
            return Err(err("--max-attempts", "must be at least 1"));
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return Err(err(
                "--backoff-initial/--backoff-max",
                "initial must be above 0 and at most max",
            ));
        }
        if self.result_ttl < Duration::from_secs(1) {
            return Err(err("--result-ttl", "must be at least 1s"));
        }
        for (name, v) in [
            ("--max-payload-bytes", self.max_payload_bytes),
            ("--max-result-bytes", self.max_result_bytes),
        ] {
            if v == 0 || v > MAX_CONFIGURABLE_BYTES {
                return Err(err(name, "must be between 1 and 67108864"));
            }
        }
        if matches!(&self.token, Some(t) if !t.bytes().all(|b| b.is_ascii_graphic())) {
            return Err(err(
                "--token",
                "must be printable ASCII without spaces (empty: no token)",
            ));
        }
        Ok(self)
    }

    /// Largest gRPC message the broker accepts: the bigger limit plus room for the envelope.
    pub fn max_message_bytes(&self) -> usize {
        self.max_payload_bytes.max(self.max_result_bytes) + 1024 * 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_token(token: Option<&str>) -> Result<Config, ConfigError> {
        Config {
            token: token.map(str::to_string),
            ..Config::default()
        }
        .validate()
    }

    #[test]
    fn an_empty_token_means_no_token() {
        assert_eq!(with_token(Some("")).unwrap().token, None);
        assert_eq!(with_token(None).unwrap().token, None);
        assert_eq!(
            with_token(Some("s3cret")).unwrap().token.as_deref(),
            Some("s3cret")
        );
    }

    #[test]
    fn durations_beyond_a_year_are_refused() {
        let e = Config {
            grace: Duration::MAX,
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.setting, "--grace");
        let e = Config {
            backoff_max: MAX_CONFIGURABLE_DURATION + Duration::from_secs(1),
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.setting, "--backoff-max");
    }

    #[test]
    fn tokens_with_spaces_or_control_characters_are_refused() {
        for bad in ["a b", " ", "tab\there", "new\nline", "caf\u{e9}"] {
            let e = with_token(Some(bad)).unwrap_err();
            assert_eq!(e.setting, "--token", "{bad:?}");
        }
    }
}
