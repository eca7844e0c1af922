-- wrk script of `python -m bench.load`: rotates over the paths in $BENCH_PATHS (one a line)
-- and prints the run's figures as one JSON line that starts with "BENCH_JSON ".
local paths = {}
local counter = 0

function init(args)
    local file = assert(io.open(os.getenv("BENCH_PATHS"), "r"))
    for line in file:lines() do
        if #line > 0 then
            paths[#paths + 1] = line
        end
    end
    file:close()
    -- threads start at different places of the list
    counter = math.random(0, #paths - 1)
end

function request()
    counter = counter + 1
    return wrk.format("GET", paths[(counter % #paths) + 1])
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, '
            .. '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, '
            .. '"min_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
        summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
        e.status, e.timeout, latency.min, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency.max
    ))
end
