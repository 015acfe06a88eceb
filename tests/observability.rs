//! One bid, one trace: a real OTLP receiver (a tonic server implementing the OTLP trace
//! service) collects spans from a real bidder and a real server; and the Prometheus
//! endpoint's counters match what the test did.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use auction::runtime::config::DEFAULT_COMMAND_CHANNEL;
use auction::wire::Event;
use auction_testkit::eventually;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use support::*;

/// One exported span: service, name, trace id (hex), string attributes.
#[derive(Clone, Debug)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    attrs: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
            .as_ref()
            .and_then(|v| v.value.as_ref())
        {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        };
        let mut out = self.spans.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Span {
                        service: service.clone(),
                        name: s.name.clone(),
                        trace_id: s.trace_id.iter().map(|b| format!("{b:02x}")).collect(),
                        attrs: s
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(&kv.value)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bid_is_one_trace_from_bidder_to_server_and_back() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let otlp = format!("http://{}", listener.local_addr().expect("addr"));
        let service = TraceServiceServer::new(receiver.clone());
        let _otlp_server = auction::runtime::task::TaskGuard::new(
            "otlp receiver",
            tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await;
            }),
        );
        let otel = |name: &str| {
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()),
                ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
                ("OTEL_SERVICE_NAME", name.to_string()),
            ]
        };
        let stack = stack().await;
        let port = free_port();
        let mut client_env = otel("test-bidder");
        client_env.push(("BID_INTERVAL", "200ms".into()));
        let mut bidder = client(&stack, "bidder-traced", port, &client_env);
        wait_subscribers(
            &stack,
            auction::runtime::config::DEFAULT_EVENT_CHANNEL,
            1,
            Duration::from_secs(20),
        )
        .await;
        let mut server_env = otel("test-server");
        server_env.push(("OPEN_ON_START", "traced lot".into()));
        server_env.push(("AUCTION_DURATION", "3s".into()));
        let mut srv = server(&stack, "server-traced", port, &server_env);
        assert_eq!(
            bidder
                .wait_exit(Duration::from_secs(30))
                .await
                .expect("bidder exits"),
            0
        );
        srv.terminate();
        srv.wait_exit(Duration::from_secs(15))
            .await
            .expect("server exits (and flushes its spans)");

        // The bidder's "bid" span and the server's "bid.judge" span share a trace id.
        let (client_span, judge) = eventually(
            "a bid span and a bid.judge span with the same bid_id",
            Duration::from_secs(20),
            || async {
                let spans = receiver.spans.lock().expect("lock").clone();
                let found = spans
                    .iter()
                    .filter(|s| s.service == "test-bidder" && s.name == "bid")
                    .find_map(|c| {
                        let bid_id = c.attrs.get("bid_id")?;
                        let judge = spans.iter().find(|s| {
                            s.service == "test-server"
                                && s.name == "bid.judge"
                                && s.attrs.get("bid_id") == Some(bid_id)
                        })?;
                        Some((c.clone(), judge.clone()))
                    });
                found.ok_or_else(|| {
                    format!(
                        "no linked bid/bid.judge spans; received: {:#?}",
                        spans
                            .iter()
                            .map(|s| (&s.service, &s.name, &s.attrs))
                            .collect::<Vec<_>>()
                    )
                })
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(
            client_span.trace_id, judge.trace_id,
            "one trace id links the bidder's bid to the server's processing"
        );
        assert!(
            judge.attrs.contains_key("outcome"),
            "the server span records the outcome: {judge:?}"
        );
        let spans = receiver.spans.lock().expect("lock").clone();
        assert!(
            spans.iter().any(|s| s.service == "test-bidder"
                && s.name == "bid.outcome"
                && s.trace_id == client_span.trace_id),
            "the bidder's outcome span is in the same trace"
        );
        assert!(spans.iter().any(
            |s| s.service == "test-server" && s.name == "admin_rpc" || s.name == "judge_batch"
        ));
    })
    .await
    .expect("bounded");
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_counts_what_happened() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let stack = stack().await;
        let tap = recorder(&stack).await;
        let metrics_port = free_port();
        let _srv = server(
            &stack,
            "server",
            free_port(),
            &[
                ("OPEN_ON_START", "metered".into()),
                ("AUCTION_DURATION", "60s".into()),
                ("STARTING_PRICE", "1".into()),
                ("MIN_INCREMENT", "1".into()),
                ("METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
            ],
        );
        let id = tap.opened(Duration::from_secs(20)).await;
        let bid = |bid_id: &str, amount: u64| {
            format!(r#"{{"v":1,"type":"bid","auction_id":"{id}","bid_id":"{bid_id}","bidder":"m","amount":{amount}}}"#)
        };
        let mut messages: Vec<String> = (1..=10).map(|n| bid(&format!("m{n}"), n)).collect();
        messages.extend(["garbage".to_string(), "{}".into(), "[]".into()]);
        messages.push(bid("m3", 3)); // a retry: duplicate
        messages.push(bid("low", 2)); // too low
        let mut conn = master_conn(&stack).await;
        for m in &messages {
            let _: u64 = redis::cmd("PUBLISH").arg(DEFAULT_COMMAND_CHANNEL).arg(m).query_async(&mut conn).await.expect("publish");
        }
        tap.wait_until("12 outcomes", Duration::from_secs(20), |evs| {
            (evs.iter().filter(|e| matches!(e, Event::BidAccepted { .. } | Event::BidRejected { .. })).count() >= 12).then_some(())
        })
        .await;
        let url = format!("http://127.0.0.1:{metrics_port}/metrics");
        let text = eventually("the metrics to show the duplicate", Duration::from_secs(10), || async {
            match scrape(&url).await {
                Some(t) if t.contains("auction_bids_duplicate_total 1") => Ok(t),
                body => Err(format!("{body:?}")),
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(metric(&text, "auction_messages_received_total"), 15.0);
        assert_eq!(metric(&text, "auction_messages_malformed_total{reason=\"malformed\"}"), 2.0, "not JSON objects");
        assert_eq!(metric(&text, "auction_messages_malformed_total{reason=\"unsupported_version\"}"), 1.0, "{{}} has no v");
        assert_eq!(metric(&text, "auction_bids_accepted_total"), 10.0);
        assert_eq!(metric(&text, "auction_bids_rejected_total{reason=\"too_low\"}"), 1.0);
        assert_eq!(metric(&text, "auction_bids_duplicate_total"), 1.0);
        assert_eq!(metric(&text, "auction_auctions_opened_total"), 1.0);
        assert_eq!(metric(&text, "auction_serving"), 1.0);
        assert!(metric(&text, "auction_events_published_total") >= 13.0);
        assert!(metric(&text, "auction_leases_acquired_total") >= 1.0);
        assert!(text.contains("auction_processing_seconds_bucket"), "latency histogram present");
    })
    .await
    .expect("bounded");
}

/// A minimal HTTP/1.1 GET over a raw socket (the test needs no HTTP client crate).
async fn scrape(url: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let mut s = tokio::net::TcpStream::connect(host).await.ok()?;
    s.write_all(
        format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut buf))
        .await
        .ok()?
        .ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_memory_is_exported_and_nearing_maxmemory_is_warned_once_per_crossing() {
    use auction_testkit::{DevStack, DevStackConfig};
    tokio::time::timeout(Duration::from_secs(120), async {
        let stack = DevStack::start(DevStackConfig {
            extra_redis_conf: vec!["maxmemory 256mb".to_owned()],
            ..DevStackConfig::default()
        })
        .await
        .expect("start the local Redis topology");
        let metrics_port = free_port();
        let srv = server(
            &stack,
            "server",
            free_port(),
            &[("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))],
        );
        let url = format!("http://127.0.0.1:{metrics_port}/metrics");
        // Polled every 5 s; waits on a value bound it.
        let reading = |want_max: u64| {
            let url = url.clone();
            async move {
                eventually(
                    &format!("auction_redis_maxmemory_bytes {want_max}"),
                    Duration::from_secs(20),
                    || async {
                        let text = scrape(&url).await.ok_or("no scrape")?;
                        let max = text
                            .lines()
                            .find_map(|l| l.strip_prefix("auction_redis_maxmemory_bytes "))
                            .unwrap_or("?");
                        if max == want_max.to_string() {
                            Ok(metric(&text, "auction_redis_used_memory_bytes"))
                        } else {
                            Err(format!("maxmemory {max}"))
                        }
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("{e:#}"))
            }
        };
        let used = reading(256 << 20).await;
        assert!(used > 0.0, "used memory is read: {used}");

        // Push the master near its limit (88 %): one warning...
        let conn = master_conn(&stack).await;
        let config_max = |max: u64| {
            let mut conn = conn.clone();
            async move {
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg(max)
                    .query_async(&mut conn)
                    .await
                    .expect("CONFIG SET");
            }
        };
        let near = (used / 0.88) as u64;
        config_max(near).await;
        reading(near).await;
        let warning = "above 80% of maxmemory";
        eventually("the warning", Duration::from_secs(20), || async {
            if srv.log().contains(warning) {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        // ...and no other at the next polls while it stays above (a new limit, still near,
        // proves a later poll happened).
        let nearer = (used / 0.87) as u64;
        config_max(nearer).await;
        reading(nearer).await;
        assert_eq!(
            srv.log().matches(warning).count(),
            1,
            "warned once per crossing:\n{}",
            srv.log()
        );
        // Back below: said once too, and the warning is armed again.
        config_max(256 << 20).await;
        reading(256 << 20).await;
        eventually("the all-clear", Duration::from_secs(20), || async {
            if srv.log().contains("back below 75% of maxmemory") {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bids_for_invented_auctions_leave_nothing_behind() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let stack = stack().await;
        let metrics_port = free_port();
        let _srv = server(&stack, "server", free_port(), &[("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))]);
        wait_subscribers(&stack, DEFAULT_COMMAND_CHANNEL, 1, Duration::from_secs(20)).await;
        let mut conn = master_conn(&stack).await;
        const N: usize = 2000;
        let mut pipe = redis::pipe();
        for n in 0..N {
            pipe.cmd("PUBLISH").arg(DEFAULT_COMMAND_CHANNEL).arg(format!(
                r#"{{"v":1,"type":"bid","auction_id":"invented-{n}","bid_id":"i{n}","bidder":"x","amount":5}}"#
            ));
        }
        let _: Vec<u64> = pipe.query_async(&mut conn).await.expect("publish");
        let url = format!("http://127.0.0.1:{metrics_port}/metrics");
        // Every bid answered unknown_auction, and the router is back to no slot and no kept bid.
        let text = eventually("every invented auction forgotten by the router", Duration::from_secs(30), || async {
            let text = scrape(&url).await.ok_or("no scrape")?;
            let unknown = text
                .lines()
                .find_map(|l| l.strip_prefix("auction_bids_rejected_total{reason=\"unknown_auction\"} "))
                .unwrap_or("0");
            let slots = text.lines().find_map(|l| l.strip_prefix("auction_router_slots ")).unwrap_or("?");
            if unknown == N.to_string() && slots == "0" { Ok(text) } else { Err(format!("{unknown} refused, {slots} slots")) }
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(metric(&text, "auction_router_kept_bids"), 0.0);
        // Nor anything in Redis.
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.expect("KEYS");
        assert!(keys.is_empty(), "{keys:?}");
    })
    .await
    .expect("bounded");
}
