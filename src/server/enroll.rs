//! `EnrollBidder`'s rule: a bidder registers its own name, and no other, without the admin
//! token (the call itself is in [`crate::server::admin`]).
//!
//! On Kubernetes every bidder pod runs from one StatefulSet template, so no install step can
//! hand each pod a key of its own without some pod seeing the others'. Instead each pod asks
//! for its key at start. What it shows is the enrollment token (shared by the bidder pods,
//! useless on its own) and where it calls from: the server resolves the name template
//! `ENROLL_HOST` (`{bidder}.auction-client`: the pod's record in its headless Service) and
//! registers a key only if the caller's address is among the answers. A pod owns its
//! address, so it can enroll its own name; claiming another pod's name needs that pod's
//! address. The key travels back over the same call and replaces any earlier one, so a
//! restarted pod simply enrolls again.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tonic::Status;

/// How long a name lookup may take before the call answers `UNAVAILABLE`.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Where the bidder's name goes in `ENROLL_HOST`.
pub const PLACEHOLDER: &str = "{bidder}";

/// The server's enrollment settings (`ENROLL_TOKEN`, `ENROLL_HOST`).
#[derive(Clone, Debug)]
pub struct Enrollment {
    /// The bearer token bidders present.
    pub token: String,
    /// The host name of a bidder, `{bidder}` standing for its name.
    pub host: String,
}

/// Checks that `bidder` is a DNS label (a-z 0-9 -, 1 to 63, no leading or trailing `-`):
/// only such a name is put into a host name to resolve.
pub fn check_name(bidder: &str) -> Result<(), String> {
    let ok_chars = bidder
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if bidder.is_empty() || bidder.len() > 63 || !ok_chars {
        return Err(format!(
            "{bidder:?} is not a DNS label (a-z 0-9 -, 1 to 63 characters): a bidder enrolls under its host name, e.g. its pod name"
        ));
    }
    if bidder.starts_with('-') || bidder.ends_with('-') {
        return Err(format!("{bidder:?} starts or ends with '-'"));
    }
    Ok(())
}

/// `ENROLL_HOST` with `{bidder}` replaced.
pub fn host_of(template: &str, bidder: &str) -> String {
    template.replace(PLACEHOLDER, bidder)
}

/// Checks an `ENROLL_HOST` template at start.
pub fn check_template(template: &str) -> Result<(), String> {
    if template.matches(PLACEHOLDER).count() != 1 {
        return Err(format!(
            "ENROLL_HOST must contain {PLACEHOLDER} exactly once (the bidder's name), e.g. {PLACEHOLDER}.auction-client"
        ));
    }
    let sample = host_of(template, "x");
    if sample.contains(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.')) {
        return Err(format!(
            "ENROLL_HOST {template:?} must be a host name (letters, digits, '-', '.') around {PLACEHOLDER}"
        ));
    }
    Ok(())
}

/// Whether the caller at `peer` may enroll under a name whose host resolved to `resolved`
/// (an IPv4 address matches itself mapped into IPv6, as a dual-stack listener reports it).
pub fn peer_matches(peer: IpAddr, resolved: &[IpAddr]) -> bool {
    resolved
        .iter()
        .any(|ip| ip.to_canonical() == peer.to_canonical())
}

/// Resolves `host` and checks that `peer` is among its addresses.
pub async fn check_caller(host: &str, peer: Option<SocketAddr>) -> Result<(), Status> {
    let peer =
        peer.ok_or_else(|| Status::internal("the caller's address is unknown to this server"))?;
    let lookup = tokio::net::lookup_host((host, 0));
    let resolved: Vec<IpAddr> = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
        Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
        Ok(Err(e)) => {
            return Err(Status::unavailable(format!(
                "{host} does not resolve ({e}): a bidder's DNS record can lag its start by a few seconds; retry (if it persists, check ENROLL_HOST and the bidders' headless Service)"
            )));
        }
        Err(_) => {
            return Err(Status::unavailable(format!(
                "looking up {host} took over {LOOKUP_TIMEOUT:?}; retry"
            )));
        }
    };
    if peer_matches(peer.ip(), &resolved) {
        return Ok(());
    }
    let listed: Vec<String> = resolved.iter().map(IpAddr::to_string).collect();
    Err(Status::permission_denied(format!(
        "{host} resolves to [{}], not to the caller's address {}: a bidder may enroll only its own name (a pod that just restarted may see its old record for a few seconds; retry)",
        listed.join(", "),
        peer.ip()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dns_labels_enroll() {
        for good in ["auction-client-0", "a", "bidder-12", &"x".repeat(63)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Auction-client-0",
            "a.b",
            "a_b",
            "-a",
            "a-",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn templates_name_the_bidder_once_in_a_host_name() {
        assert!(check_template("{bidder}.auction-client").is_ok());
        assert!(check_template("{bidder}").is_ok());
        assert!(check_template("auction-client").is_err());
        assert!(check_template("{bidder}.{bidder}").is_err());
        assert!(check_template("{bidder}:80").is_err());
        assert_eq!(
            host_of("{bidder}.auction-client", "auction-client-2"),
            "auction-client-2.auction-client"
        );
    }

    #[test]
    fn a_mapped_ipv4_caller_matches_its_ipv4_record() {
        let v4: IpAddr = "10.1.2.3".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert!(peer_matches(mapped, &[v4]));
        assert!(peer_matches(v4, &["::1".parse().expect("ip"), v4]));
        assert!(!peer_matches("10.1.2.4".parse().expect("ip"), &[v4]));
        assert!(!peer_matches(v4, &[]));
    }
}
