# Shared by callgrind.sh and overhead.sh (sourced): free loopback ports and the nginx
# upstream both load (one worker, "ok\n" for every path, no access log).

# Prints N free TCP ports on 127.0.0.1, space-separated.
free_ports() { # n
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])' "$1"
}

# Writes DIR/nginx.conf for an upstream on 127.0.0.1:PORT (start it with
# `nginx -c DIR/nginx.conf -p DIR`).
nginx_upstream_conf() { # dir, port
    local user_line=""
    [ "$(id -u)" = 0 ] && user_line="user root;"
    mkdir -p "$1/logs"
    cat >"$1/nginx.conf" <<NGINX
$user_line
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    server { listen 127.0.0.1:$2; location / { return 200 "ok\n"; } }
}
NGINX
}
