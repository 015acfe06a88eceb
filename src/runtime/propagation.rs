//! W3C trace context across process boundaries: inside Pub/Sub messages (`traceparent`)
//! and in gRPC metadata, so one bid is one trace from bidder to server and back.
//!
//! Without an OTLP exporter the spans carry no OpenTelemetry context, nothing is injected,
//! and all of this costs a map lookup.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `traceparent` of `span`, if it is being traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes the remote span named by `traceparent` the parent of `span`.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Sets `span`'s parent from a gRPC request's `traceparent` metadata, if present.
pub fn set_parent_from_metadata(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    if let Some(tp) = metadata.get("traceparent").and_then(|v| v.to_str().ok()) {
        set_parent(span, tp);
    }
}

/// Adds the current span's `traceparent` to an outgoing gRPC request.
pub fn inject_into<T>(request: &mut tonic::Request<T>) {
    if let Some(tp) = traceparent(&tracing::Span::current())
        && let Ok(value) = tp.parse()
    {
        request.metadata_mut().insert("traceparent", value);
    }
}
