//! Traces: one OpenTelemetry span per request the coordinator answers,
//! continuing the caller's trace from the W3C `traceparent` header of its
//! NATS message, and handed back in the reply's headers, so an agent's span
//! and the coordinator's decision are one trace. Export goes over OTLP/HTTP
//! when an endpoint is configured (a batch processor on its own thread);
//! without one, spans are still made, and their context still travels.

use std::collections::HashMap;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::config::TelemetryConfig;

/// The trace context of a request, carried from its message to its reply.
pub type TraceContext = Context;

/// The coordinator's tracer and its exporter, if any.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    exporting: bool,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint `{endpoint}`: {detail}")]
pub struct TelemetryError {
    /// The configured endpoint.
    pub endpoint: String,
    /// What went wrong.
    pub detail: String,
}

impl Telemetry {
    /// A tracer for `cfg`: exporting if it names an endpoint.
    pub fn new(cfg: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
        let service = cfg.service_name.clone().unwrap_or_else(|| "concord".into());
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service)
            .build();
        let mut builder = SdkTracerProvider::builder().with_resource(resource);
        let exporting = cfg.otlp_endpoint.is_some();
        if let Some(endpoint) = &cfg.otlp_endpoint {
            let url = if endpoint.ends_with("/v1/traces") {
                endpoint.clone()
            } else {
                format!("{}/v1/traces", endpoint.trim_end_matches('/'))
            };
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(url)
                .build()
                .map_err(|e| TelemetryError {
                    endpoint: endpoint.clone(),
                    detail: e.to_string(),
                })?;
            builder = builder.with_batch_exporter(exporter);
        }
        let provider = builder.build();
        let tracer = provider.tracer("concord");
        Ok(Telemetry {
            provider,
            tracer,
            exporting,
        })
    }

    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Starts the span of one request, a child of the trace in `headers` if
    /// they carry one (else a new trace).
    pub fn request_span(&self, name: &'static str, headers: Option<&HeaderMap>, attrs: Vec<KeyValue>) -> TraceContext {
        let parent = extract(headers);
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        parent.with_span(span)
    }

    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(&self) {
        if self.exporting
            && let Err(e) = self.provider.shutdown()
        {
            tracing::warn!("telemetry: {e}");
        }
    }
}

/// Ends a request's span with these attributes, and returns headers that
/// carry its context to the reply's receiver.
pub fn finish(cx: &TraceContext, attrs: Vec<KeyValue>) -> HeaderMap {
    let span = cx.span();
    for kv in attrs {
        span.set_attribute(kv);
    }
    let headers = inject(cx);
    span.end();
    headers
}

/// The trace context in `headers` (W3C `traceparent`/`tracestate`), or none.
pub fn extract(headers: Option<&HeaderMap>) -> Context {
    match headers {
        Some(h) => TraceContextPropagator::new().extract(&HeaderExtractor(h)),
        None => Context::new(),
    }
}

/// Headers carrying `cx` (W3C `traceparent`/`tracestate`).
pub fn inject(cx: &Context) -> HeaderMap {
    let mut fields = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut fields);
    let mut h = HeaderMap::new();
    for (k, v) in fields {
        h.insert(k.as_str(), v.as_str());
    }
    h
}

/// The trace id in `headers`' `traceparent`, as 32 hex digits.
pub fn trace_id(headers: Option<&HeaderMap>) -> Option<String> {
    let cx = extract(headers);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}
