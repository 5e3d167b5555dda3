//! A tower layer that answers an oversized request with RESOURCE_EXHAUSTED, as gRPC's status-code
//! table says a server should, instead of tonic's OUT_OF_RANGE ("Error, decoded message length
//! too large"): clients and load balancers treat the two differently.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

const TONIC_MESSAGE: &str = "Error, decoded message length too large";

/// The layer.
#[derive(Clone, Copy, Default)]
pub struct OversizedLayer;

impl<S> tower::Layer<S> for OversizedLayer {
    type Service = Oversized<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Oversized { inner }
    }
}

/// A service rewriting oversized-message statuses.
#[derive(Clone)]
pub struct Oversized<S> {
    inner: S,
}

fn is_oversized(headers: &http::HeaderMap) -> bool {
    let code = headers.get("grpc-status").and_then(|v| v.to_str().ok());
    let message = headers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("");
    // grpc-message is percent-encoded: spaces become %20.
    let message = message.replace("%20", " ");
    code == Some("11") && message.starts_with(TONIC_MESSAGE)
}

impl<S, B, R> tower::Service<http::Request<B>> for Oversized<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            if is_oversized(response.headers()) {
                response.headers_mut().insert("grpc-status", http::HeaderValue::from_static("8"));
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_oversized_out_of_range_is_rewritten() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", http::HeaderValue::from_static("11"));
        h.insert(
            "grpc-message",
            http::HeaderValue::from_static(
                "Error,%20decoded%20message%20length%20too%20large:%20found%205242885%20bytes",
            ),
        );
        assert!(is_oversized(&h));
        h.insert("grpc-message", http::HeaderValue::from_static("page%20out%20of%20range"));
        assert!(!is_oversized(&h));
    }
}
