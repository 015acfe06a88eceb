//! Configuration shared by both binaries: how to reach Redis through Sentinel, the channel
//! names, and parsers for the values operators type (durations like `30s` or `500ms`).
//!
//! Every value is a typed field of a clap struct with an environment-variable fallback, so
//! `--help` documents it and bad input fails before any socket is opened.

use std::time::Duration;

/// Default Sentinel master name (the prototype's and Redis's conventional one).
pub const DEFAULT_MASTER_NAME: &str = "mymaster";
/// Default command channel (bids), the prototype's name.
pub const DEFAULT_COMMAND_CHANNEL: &str = "comando-leilao";
/// Default event channel, the prototype's name.
pub const DEFAULT_EVENT_CHANNEL: &str = "notificacao-leilao";

/// A `host:port` pair as given by an operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or IP literal.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port (e.g. 127.0.0.1:26379)"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?} has an empty host"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?} has an invalid port (1-65535)"))?;
        Ok(HostPort {
            host: host.to_owned(),
            port,
        })
    }
}

/// Parses a human duration (`30s`, `500ms`, `2m`) that must be positive.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration_or_off(s)?;
    if d.is_zero() {
        return Err(format!("{s:?} must be greater than zero"));
    }
    Ok(d)
}

/// Parses a human duration where zero (`0`, `0s`) means "off".
pub fn parse_duration_or_off(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 30s or 500ms: {e}"))
}

/// Parses a channel name: 1-128 printable ASCII characters without spaces.
pub fn parse_channel(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a channel name (1-128 printable ASCII characters, no spaces)"
        ))
    }
}

/// How to reach Redis: Sentinels, master name, credentials, channels.
#[derive(clap::Args, Clone, Debug)]
pub struct RedisArgs {
    /// Sentinel addresses, comma-separated host:port; asked in turn for the master.
    #[arg(long, env = "REDIS_SENTINELS", value_delimiter = ',', required = true, num_args = 1..)]
    pub sentinels: Vec<HostPort>,
    /// The master name the Sentinels monitor.
    #[arg(long, env = "REDIS_MASTER_NAME", default_value = DEFAULT_MASTER_NAME)]
    pub master_name: String,
    /// Redis ACL user for the master and replicas (omit for the default user).
    #[arg(long, env = "REDIS_USERNAME")]
    pub redis_username: Option<String>,
    /// Password for the Redis user.
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// ACL user on the Sentinels, when they require one.
    #[arg(long, env = "SENTINEL_USERNAME")]
    pub sentinel_username: Option<String>,
    /// Password on the Sentinels.
    #[arg(long, env = "SENTINEL_PASSWORD", hide_env_values = true)]
    pub sentinel_password: Option<String>,
    /// Channel bidders publish bids on.
    #[arg(long, env = "COMMAND_CHANNEL", default_value = DEFAULT_COMMAND_CHANNEL, value_parser = parse_channel)]
    pub command_channel: String,
    /// Channel the server publishes events on.
    #[arg(long, env = "EVENT_CHANNEL", default_value = DEFAULT_EVENT_CHANNEL, value_parser = parse_channel)]
    pub event_channel: String,
}

impl RedisArgs {
    /// Arguments for a local topology (tests, demos): defaults everywhere but the Sentinels.
    pub fn local(sentinels: &[String]) -> Result<Self, String> {
        Ok(Self {
            sentinels: sentinels
                .iter()
                .map(|s| s.parse())
                .collect::<Result<_, _>>()?,
            master_name: DEFAULT_MASTER_NAME.into(),
            redis_username: None,
            redis_password: None,
            sentinel_username: None,
            sentinel_password: None,
            command_channel: DEFAULT_COMMAND_CHANNEL.into(),
            event_channel: DEFAULT_EVENT_CHANNEL.into(),
        })
    }

    /// Checks what clap cannot: a non-empty master name, distinct channels.
    pub fn validate(&self) -> Result<(), String> {
        if self.master_name.trim().is_empty() {
            return Err("REDIS_MASTER_NAME must not be empty".into());
        }
        if self.command_channel == self.event_channel {
            return Err(format!(
                "COMMAND_CHANNEL and EVENT_CHANNEL must differ (both are {:?})",
                self.command_channel
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parsing() {
        let hp: HostPort = "redis-sentinel-0.redis:26379".parse().expect("valid");
        assert_eq!(hp.port, 26379);
        assert_eq!("[::1]:26379".parse::<HostPort>().expect("v6").host, "::1");
        assert!("nohost".parse::<HostPort>().is_err());
        assert!("h:0".parse::<HostPort>().is_err());
        assert!(":1".parse::<HostPort>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
