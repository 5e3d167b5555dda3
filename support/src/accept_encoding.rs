//! A tower layer that advertises, on every gRPC response, the message encodings the server
//! accepts (`grpc-accept-encoding`), as the gRPC compression spec asks, so that a client learns it
//! may compress without first being refused.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

const HEADER: &str = "grpc-accept-encoding";

/// The layer; `encodings` is the header's value, e.g. `"gzip"`.
#[derive(Clone, Copy)]
pub struct AdvertiseEncodingLayer(pub &'static str);

impl<S> tower::Layer<S> for AdvertiseEncodingLayer {
    type Service = AdvertiseEncoding<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdvertiseEncoding { inner, value: http::HeaderValue::from_static(self.0) }
    }
}

/// A service adding `grpc-accept-encoding` to gRPC responses that lack it.
#[derive(Clone)]
pub struct AdvertiseEncoding<S> {
    inner: S,
    value: http::HeaderValue,
}

fn advertise(headers: &mut http::HeaderMap, value: &http::HeaderValue) {
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc && !headers.contains_key(HEADER) {
        headers.insert(HEADER, value.clone());
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for AdvertiseEncoding<S>
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
        let value = self.value.clone();
        Box::pin(async move {
            let mut response = future.await?;
            advertise(response.headers_mut(), &value);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_responses_get_the_header_once_and_others_none() {
        let value = http::HeaderValue::from_static("gzip");
        let mut h = http::HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        advertise(&mut h, &value);
        assert_eq!(h.get(HEADER).unwrap(), "gzip");
        // An answer that already says what it accepts keeps its own value.
        h.insert(HEADER, http::HeaderValue::from_static("identity"));
        advertise(&mut h, &value);
        assert_eq!(h.get(HEADER).unwrap(), "identity");
        let mut plain = http::HeaderMap::new();
        plain.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
        advertise(&mut plain, &value);
        assert!(plain.get(HEADER).is_none());
    }
}
