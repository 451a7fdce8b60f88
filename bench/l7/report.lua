-- wrk's summary as one line of JSON for operator/examples/bench-l7.rs (only `done` is
-- defined, so wrk keeps its fast C path for every request and response).
-- `status` counts responses with a status >= 400.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_L7 {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
end
