//! Logs and traces: `tracing` everywhere, human-readable or JSON logs, and OpenTelemetry
//! OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! With no endpoint configured no exporter is built at all, so tracing costs only the
//! `tracing` subscriber. The standard `OTEL_*` variables (service name, sampler, headers)
//! are read by the OpenTelemetry SDK itself.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Keeps the exporter alive; flushes spans when dropped (at shutdown).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("could not flush traces to the OTLP endpoint: {e}");
        }
    }
}

/// Installs the global subscriber for `service`. `RUST_LOG` filters (default `info`);
/// `LOG_FORMAT=json` switches to JSON lines.
pub fn init(service: &'static str) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let provider = match endpoint {
        Some(_) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| {
                    anyhow::anyhow!(
                        "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter cannot start: {e}"
                    )
                })?;
            let service_name =
                std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name)
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    Ok(Telemetry { provider })
}
