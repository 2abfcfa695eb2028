{{/*
The gateway's config file (JSON, read by gateway.settings.load_gateway_settings) and the
facilitator's (TOML, read by facilitator.settings.load_settings). Secrets are never written here:
they are "$VAR" references the loaders resolve from the environment, or environment overrides.
*/}}
{{- define "x402.publicUrl" -}}
{{- $g := .Values.gateway }}
{{- if $g.publicUrl }}
{{- $g.publicUrl }}
{{- else if and .Values.ingress.enabled .Values.ingress.hosts }}
{{- $host := (first .Values.ingress.hosts).host }}
{{- $tls := false }}
{{- range .Values.ingress.tls }}{{ if has $host (default list .hosts) }}{{ $tls = true }}{{ end }}{{ end }}
{{- printf "%s://%s" (ternary "https" "http" $tls) $host }}
{{- end }}
{{- end }}

{{- define "x402.upstreamAuthEnvName" -}}GATEWAY_UPSTREAM_{{ upper . }}_AUTH{{- end }}
{{- define "x402.teeRpcEnvName" -}}GATEWAY_TEE_{{ upper . }}_RPC_URL{{- end }}

{{- define "x402.gatewayConfig" -}}
{{- $v := .Values }}
{{- $g := $v.gateway }}
{{- $cfg := dict "host" "0.0.0.0" "port" (int $g.containerPort) "pay_to" $g.payTo "store_prefix" $g.storePrefix
      "settle_timeout_s" $g.settleTimeoutSeconds "verify_timeout_s" $g.verifyTimeoutSeconds
      "record_lease_s" $g.recordLeaseSeconds "max_body_bytes" (int64 $g.maxBodyBytes) "log_level" $g.logLevel
      "recovery_interval_s" $g.recoveryIntervalSeconds "funds_poll_s" $g.fundsPollSeconds }}
{{- if $g.rpcUrls }}{{ $_ := set $cfg "rpc_urls" $g.rpcUrls }}{{ end }}
{{- with $g.quote }}
{{- $q := dict "currency" (default "USD" .currency) "rates" (default dict .rates) }}
{{- if .feedUrl }}{{ $_ := set $q "feed_url" .feedUrl }}{{ end }}
{{- if .refreshSeconds }}{{ $_ := set $q "refresh_s" .refreshSeconds }}{{ end }}
{{- if .maxAgeSeconds }}{{ $_ := set $q "max_age_s" .maxAgeSeconds }}{{ end }}
{{- $_ := set $cfg "quote" $q }}
{{- end }}
{{- with include "x402.publicUrl" . }}{{ $_ := set $cfg "public_url" . }}{{ end }}
{{- with $g.console }}
{{- $_ := set $cfg "console" .enabled }}
{{- $_ := set $cfg "console_session_s" .sessionSeconds }}
{{- with .explorerTxUrl }}{{ $_ := set $cfg "explorer_tx_url" . }}{{ end }}
{{- end }}
{{- $mode := include "x402.facilitatorMode" . }}
{{- if eq $mode "inprocess" }}
{{- $_ := set $cfg "facilitator" (dict "mode" "local" "config_file" "/etc/x402/facilitator.toml") }}
{{- else }}
{{- $fac := dict "mode" "remote" "url" (include "x402.facilitatorUrl" .) "timeout_s" $g.settleTimeoutSeconds }}
{{- if and (eq $mode "external") $v.facilitator.external.authHeader }}
{{- $_ := set $fac "auth_header" $v.facilitator.external.authHeader }}
{{- $_ := set $fac "auth_value" "$GATEWAY_FACILITATOR_AUTH" }}
{{- end }}
{{- $_ := set $cfg "facilitator" $fac }}
{{- end }}
{{- $accepts := list }}
{{- range $g.accepts }}
{{- $o := dict "network" .network "asset" .asset "symbol" .symbol "decimals" (int .decimals) "scheme" "exact"
      "transfer_method" .transferMethod "eip712_name" .eip712Name "eip712_version" .eip712Version }}
{{- if .maxTimeoutSeconds }}{{ $_ := set $o "max_timeout_seconds" (int .maxTimeoutSeconds) }}{{ end }}
{{- if .payTo }}{{ $_ := set $o "pay_to" .payTo }}{{ end }}
{{- $accepts = append $accepts $o }}
{{- end }}
{{- $_ := set $cfg "accepts" $accepts }}
{{- $ups := dict }}
{{- range $name, $up := $g.upstreams }}
{{- $u := dict "urls" (default list $up.urls) }}
{{- if eq (default "urls" $up.kind) "workers" }}
{{- $_ := set $u "kind" "workers" }}
{{- $w := dict }}
{{- $keys := dict "protocol" "protocol" "dns" "dns" "port" "port" "models" "models" "balance" "balance"
      "resolveEverySeconds" "resolve_every_s" "probeEverySeconds" "probe_every_s" "maxConcurrency" "max_concurrency"
      "maxQueue" "max_queue" "queueTimeoutSeconds" "queue_timeout_s" "retryAfterSeconds" "retry_after_s"
      "ejectAfter" "eject_after" "ejectBaseSeconds" "eject_base_s" "ejectMaxSeconds" "eject_max_s" }}
{{- range $k, $v := (default dict $up.workers) }}
{{- $_ := set $w (get $keys $k) $v }}
{{- end }}
{{- $_ := set $u "workers" $w }}
{{- end }}
{{- if eq (default "urls" $up.kind) "tee" }}
{{- $_ := set $u "kind" "tee" }}
{{- $rpc := ternary $up.tee.rpcUrl (printf "$%s" (include "x402.teeRpcEnvName" $name)) (not (empty $up.tee.rpcUrl)) }}
{{- $t := dict "registry" $up.tee.registry "rpc_url" $rpc }}
{{- $keys := dict "teeType" "tee_type" "refreshSeconds" "refresh_s" "heartbeatMaxAgeSeconds" "heartbeat_max_age_s"
      "signatureMaxAgeSeconds" "signature_max_age_s" "clockSkewSeconds" "clock_skew_s" "ejectAfter" "eject_after"
      "ejectSeconds" "eject_s" "exactStreams" "exact_streams" }}
{{- range $k, $v := $up.tee }}
{{- if hasKey $keys $k }}{{ $_ := set $t (get $keys $k) $v }}{{ end }}
{{- end }}
{{- $_ := set $u "tee" $t }}
{{- end }}
{{- if $up.timeoutSeconds }}{{ $_ := set $u "timeout_s" $up.timeoutSeconds }}{{ end }}
{{- if $up.connectTimeoutSeconds }}{{ $_ := set $u "connect_timeout_s" $up.connectTimeoutSeconds }}{{ end }}
{{- if $up.auth }}
{{- $_ := set $u "auth_header" (default "Authorization" $up.auth.header) }}
{{- $_ := set $u "auth_value" (printf "$%s" (include "x402.upstreamAuthEnvName" $name)) }}
{{- end }}
{{- $_ := set $ups $name $u }}
{{- end }}
{{- $_ := set $cfg "upstreams" $ups }}
{{- $routes := list }}
{{- range $g.routes }}
{{- $r := dict "method" (default "POST" .method) "path" .path "upstream" .upstream }}
{{- if .price }}{{ $_ := set $r "price" .price }}{{ end }}
{{- if .models }}{{ $_ := set $r "models" .models }}{{ end }}
{{- if .description }}{{ $_ := set $r "description" .description }}{{ end }}
{{- if .mimeType }}{{ $_ := set $r "mime_type" .mimeType }}{{ end }}
{{- if .schemes }}{{ $_ := set $r "schemes" .schemes }}{{ end }}
{{- if .tokenPrices }}{{ $_ := set $r "token_prices" .tokenPrices }}{{ end }}
{{- if .maxPerCall }}{{ $_ := set $r "max_per_call" .maxPerCall }}{{ end }}
{{- if .maxTokensCap }}{{ $_ := set $r "max_tokens_cap" (int .maxTokensCap) }}{{ end }}
{{- with .sessions }}
{{- $s := dict }}
{{- $keys := dict "cap" "cap" "idleSeconds" "idle_s" "settleMarginSeconds" "settle_margin_s"
      "serveMarginSeconds" "serve_margin_s" "maxTimeoutSeconds" "max_timeout_s" "maxExposure" "max_exposure"
      "watchFunds" "watch_funds" }}
{{- range $k, $v := . }}{{ $_ := set $s (required (printf "unknown sessions key %s" $k) (get $keys $k)) $v }}{{ end }}
{{- $_ := set $r "sessions" $s }}
{{- end }}
{{- if .batch }}
{{- $bt := $g.batch }}
{{- $bc := dict "receiver_authorizer_key" "$GATEWAY_BATCH_AUTHORIZER_KEY" "withdraw_delay_s" (int $bt.withdrawDelaySeconds)
      "claim_interval_s" $bt.claimIntervalSeconds "settle_interval_s" $bt.settleIntervalSeconds "sync_interval_s" $bt.syncIntervalSeconds }}
{{- if $bt.minDeposit }}{{ $_ := set $bc "min_deposit" $bt.minDeposit }}{{ end }}
{{- $_ := set $r "batch" $bc }}
{{- end }}
{{- $routes = append $routes $r }}
{{- end }}
{{- $_ := set $cfg "routes" $routes }}
{{- $pr := $g.proofs }}
{{- if $pr.enabled }}
{{- $rpc := ternary $pr.rpcUrl "$GATEWAY_PROOFS_RPC_URL" (not (empty $pr.rpcUrl)) }}
{{- $_ := set $cfg "proofs" (dict "relay" $pr.relay "chain_id" (int $pr.chainId) "rpc_url" $rpc
      "signer_key" "$GATEWAY_PROOFS_SIGNER_KEY" "interval_s" $pr.intervalSeconds "max_batch" (int $pr.maxBatch)
      "blob_dir" $pr.blobDir) }}
{{- end }}
{{- $b := $g.budgets }}
{{- if $b.enabled }}
{{- $bud := dict "enabled" true "timezone" $b.timezone "default" $b.default "default_daily" $b.defaultDaily
      "hold_s" $b.holdSeconds "lease_calls" (int (default 0 $b.leaseCalls)) "lease_s" (default 2 $b.leaseSeconds)
      "store_prefix" $b.storePrefix "admin_prefix" $b.adminPrefix
      "reconcile_every_s" $b.reconcileEverySeconds "reconcile_window_blocks" (int $b.reconcileWindowBlocks)
      "reconcile_lag_blocks" (int $b.reconcileLagBlocks) }}
{{- if $b.defaultPerCall }}{{ $_ := set $bud "default_per_call" $b.defaultPerCall }}{{ end }}
{{- $_ := set $bud "default_rate_per_minute" (ternary (int $b.defaultRatePerMinute) nil (gt (int $b.defaultRatePerMinute) 0)) }}
{{- $policies := list }}
{{- range $b.policies }}
{{- $p := dict "network" .network "asset" .asset }}
{{- if .agent }}{{ $_ := set $p "agent" .agent }}{{ end }}
{{- if .groupName }}{{ $_ := set $p "group_name" .groupName }}{{ end }}
{{- if .limits }}
{{- $limits := list }}
{{- range .limits }}{{ $limits = append $limits (dict "period" .period "amount" .amount "rolling" (default false .rolling)) }}{{ end }}
{{- $_ := set $p "limits" $limits }}
{{- end }}
{{- if .perCallMax }}{{ $_ := set $p "per_call_max" .perCallMax }}{{ end }}
{{- if .allowedRoutes }}{{ $_ := set $p "allowed_routes" .allowedRoutes }}{{ end }}
{{- if .allowedModels }}{{ $_ := set $p "allowed_models" .allowedModels }}{{ end }}
{{- if .rateLimit }}{{ $_ := set $p "rate_limit" (dict "per_minute" (int .rateLimit.perMinute) "burst" (int (default 0 .rateLimit.burst))) }}{{ end }}
{{- if .suspended }}{{ $_ := set $p "suspended" true }}{{ end }}
{{- if .group }}{{ $_ := set $p "group" .group }}{{ end }}
{{- $policies = append $policies $p }}
{{- end }}
{{- $_ := set $bud "policies" $policies }}
{{- $_ := set $cfg "budgets" $bud }}
{{- end }}
{{- toPrettyJson $cfg }}
{{- end }}

{{- define "x402.facilitatorConfig" -}}
{{- $v := .Values }}
{{- $f := $v.facilitator -}}
# Rendered by the x402-gateway chart. Signer keys (FACILITATOR_SIGNER_KEYS), the store URL
# (FACILITATOR_STORE_URL) and RPC URLs (FACILITATOR_RPC_URL_<chain id>) come from Secrets.
host = "0.0.0.0"
port = {{ int $f.containerPort }}
store_prefix = {{ $f.storePrefix | toJson }}
receipt_timeout_s = {{ $f.receiptTimeoutSeconds }}
reconcile_interval_s = {{ $f.reconcileIntervalSeconds }}
state_poll_s = {{ $f.statePollSeconds }}
claim_lease_s = {{ $f.claimLeaseSeconds }}
log_level = {{ $f.logLevel | toJson }}
{{- range $net := $f.networks }}

[[networks]]
network = {{ $net.network | toJson }}
rpc_url = "$FACILITATOR_RPC_URL_{{ include "x402.chainId" $net.network }}"
{{- with $net.permit2 }}
permit2 = {{ . | toJson }}
{{- end }}
{{- with $net.exactProxy }}
exact_proxy = {{ . | toJson }}
{{- end }}
{{- with $net.uptoProxy }}
upto_proxy = {{ . | toJson }}
{{- end }}
{{- $seen := dict }}
{{- range $v.gateway.accepts }}
{{- if and (eq .network $net.network) (not (hasKey $seen (lower .asset))) }}
{{- $_ := set $seen (lower .asset) true }}

[[networks.tokens]]
address = {{ .asset | toJson }}
symbol = {{ .symbol | toJson }}
decimals = {{ int .decimals }}
transfer_method = {{ .transferMethod | toJson }}
eip712_name = {{ .eip712Name | toJson }}
eip712_version = {{ .eip712Version | toJson }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
