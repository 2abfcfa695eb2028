{{/*
Names and labels. Selectors hold only app.kubernetes.io/name, /instance and /component (the three
Deployments of one release must not select each other's pods); everything else is in `labels`.
*/}}
{{- define "x402.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "x402.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>", cut to 63 characters. Call with (list $ "suffix"). */}}
{{- define "x402.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "x402.fullname" $root | trunc 50 | trimSuffix "-") (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "x402.gatewayName" -}}{{ include "x402.fullname" . }}{{- end }}
{{- define "x402.facilitatorName" -}}{{ include "x402.componentName" (list . "facilitator") }}{{- end }}
{{- define "x402.redisName" -}}{{ include "x402.componentName" (list . "redis") }}{{- end }}
{{- define "x402.secretName" -}}{{ include "x402.componentName" (list . "secrets") }}{{- end }}

{{- define "x402.namespace" -}}{{ .Release.Namespace }}{{- end }}

{{- define "x402.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "x402.selectorLabels" -}}
app.kubernetes.io/name: {{ include "x402.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "x402.labels" -}}
helm.sh/chart: {{ include "x402.chart" . }}
{{ include "x402.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: x402
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels and selector labels of one component. Call with (list $ "gateway"). */}}
{{- define "x402.componentLabels" -}}
{{ include "x402.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "x402.componentSelectorLabels" -}}
{{ include "x402.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "x402.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "x402.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "x402.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "x402.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
{{- if kindIs "string" . }}
  - name: {{ . }}
{{- else }}
  - name: {{ .name }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "x402.redisImage" -}}
{{- $img := .Values.redis.bundled.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository $img.tag }}
{{- end }}
{{- end }}

{{/*
Who runs the facilitator: "service" (its own Deployment), "external" (a URL) or "inprocess" (inside
each gateway process, which then holds the signer keys).
*/}}
{{- define "x402.facilitatorMode" -}}
{{- if .Values.facilitator.enabled }}service{{- else if .Values.facilitator.external.url }}external{{- else }}inprocess{{- end }}
{{- end }}

{{- define "x402.facilitatorUrl" -}}
{{- if .Values.facilitator.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "x402.facilitatorName" .) .Release.Namespace (int .Values.facilitator.service.port) }}
{{- else }}
{{- .Values.facilitator.external.url }}
{{- end }}
{{- end }}

{{/* Key of an inline secret value in the chart's Secret. */}}
{{- define "x402.upstreamSecretKey" -}}upstream-{{ . | replace "_" "-" }}-auth{{- end }}
{{- define "x402.rpcSecretKey" -}}rpc-url-{{ . }}{{- end }}

{{- define "x402.chainId" -}}{{ regexReplaceAll "^eip155:" . "" }}{{- end }}

{{/* Does a route offer batch-settlement channels? "true" or "". */}}
{{- define "x402.batchRoutes" -}}
{{- range .Values.gateway.routes }}{{ if .batch }}true{{ end }}{{ end }}
{{- end }}

{{/* Is there anything inline for the chart's own Secret? "true" or "". */}}
{{- define "x402.hasInlineSecrets" -}}
{{- $v := .Values }}
{{- $any := false }}
{{- if $v.facilitator.signer.keys }}{{ $any = true }}{{ end }}
{{- if and (include "x402.batchRoutes" .) $v.gateway.batch.receiverAuthorizerKey.value (not $v.gateway.batch.receiverAuthorizerKey.existingSecret) }}{{ $any = true }}{{ end }}
{{- if and $v.gateway.budgets.enabled $v.gateway.budgets.adminToken.value (not $v.gateway.budgets.adminToken.existingSecret) }}{{ $any = true }}{{ end }}
{{- range $name, $up := $v.gateway.upstreams }}
{{- if and $up.auth $up.auth.value (not $up.auth.existingSecret) }}{{ $any = true }}{{ end }}
{{- end }}
{{- range $v.facilitator.networks }}
{{- if and .rpcUrl (not .existingSecret) }}{{ $any = true }}{{ end }}
{{- end }}
{{- if and (eq $v.redis.mode "external") $v.redis.external.password (not $v.redis.external.existingSecret) }}{{ $any = true }}{{ end }}
{{- if and (eq $v.redis.mode "bundled") $v.redis.bundled.auth.enabled (not $v.redis.bundled.auth.existingSecret) }}{{ $any = true }}{{ end }}
{{- if $any }}true{{ end }}
{{- end }}

{{/*
The bundled Redis password: the value given, else the one already in the release's Secret (an
upgrade keeps it), else a new random one.
*/}}
{{- define "x402.bundledRedisPassword" -}}
{{- if .Values.redis.bundled.auth.password }}
{{- .Values.redis.bundled.auth.password }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "x402.secretName" .) }}
{{- if and $existing $existing.data (index $existing.data "redis-password") }}
{{- index $existing.data "redis-password" | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment of every process that talks to Redis: the password from its Secret first, then the
store URLs built on it (kubelet expands $(X402_REDIS_PASSWORD)). Never the password itself.
Call with (list $ "gateway"|"facilitator"|"inprocess").
*/}}
{{- define "x402.redisEnv" -}}
{{- $root := index . 0 }}
{{- $who := index . 1 }}
{{- $r := $root.Values.redis }}
{{- $url := "" }}
{{- $urlFrom := dict }}
{{- if eq $r.mode "bundled" }}
{{- $host := printf "%s.%s.svc:6379" (include "x402.redisName" $root) $root.Release.Namespace }}
{{- if $r.bundled.auth.enabled }}
- name: X402_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ default (include "x402.secretName" $root) $r.bundled.auth.existingSecret }}
      key: {{ ternary $r.bundled.auth.existingSecretPasswordKey "redis-password" (not (empty $r.bundled.auth.existingSecret)) }}
{{- $url = printf "redis://:$(X402_REDIS_PASSWORD)@%s/0" $host }}
{{- else }}
{{- $url = printf "redis://%s/0" $host }}
{{- end }}
{{- else if and $r.external.existingSecret $r.external.existingSecretUrlKey }}
{{- $urlFrom = dict "name" $r.external.existingSecret "key" $r.external.existingSecretUrlKey }}
{{- else }}
{{- $scheme := regexFind "^rediss?://" $r.external.url }}
{{- $rest := trimPrefix $scheme $r.external.url }}
{{- /* The services pick their Redis client from the scheme: redis+cluster://, redis+sentinel://. */}}
{{- if ne $r.external.topology "standalone" }}
{{- $scheme = printf "%s+%s://" (trimSuffix "://" $scheme) $r.external.topology }}
{{- end }}
{{- if or $r.external.password $r.external.existingSecret }}
- name: X402_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ default (include "x402.secretName" $root) $r.external.existingSecret }}
      key: {{ ternary $r.external.existingSecretPasswordKey "redis-password" (not (empty $r.external.existingSecret)) }}
{{- $url = printf "%s%s:$(X402_REDIS_PASSWORD)@%s" $scheme $r.external.username $rest }}
{{- else }}
{{- $url = $r.external.url }}
{{- end }}
{{- end }}
{{- $names := list }}
{{- if eq $who "gateway" }}{{ $names = list "GATEWAY_STORE_URL" }}{{ end }}
{{- if eq $who "facilitator" }}{{ $names = list "FACILITATOR_STORE_URL" }}{{ end }}
{{- if eq $who "inprocess" }}{{ $names = list "GATEWAY_STORE_URL" "FACILITATOR_STORE_URL" }}{{ end }}
{{- range $names }}
- name: {{ . }}
{{- if $urlFrom }}
  valueFrom:
    secretKeyRef:
      name: {{ $urlFrom.name }}
      key: {{ $urlFrom.key }}
{{- else }}
  value: {{ $url | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Signer keys and RPC URLs: the environment of whoever runs the facilitator. */}}
{{- define "x402.facilitatorSecretEnv" -}}
{{- $v := .Values }}
- name: FACILITATOR_SIGNER_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ default (include "x402.secretName" .) $v.facilitator.signer.existingSecret }}
      key: {{ ternary $v.facilitator.signer.existingSecretKey "signer-keys" (not (empty $v.facilitator.signer.existingSecret)) }}
{{- range $v.facilitator.networks }}
{{- $id := include "x402.chainId" .network }}
- name: FACILITATOR_RPC_URL_{{ $id }}
  valueFrom:
    secretKeyRef:
{{- if .existingSecret }}
      name: {{ .existingSecret }}
      key: {{ .existingSecretKey }}
{{- else }}
      name: {{ include "x402.secretName" $ }}
      key: {{ include "x402.rpcSecretKey" $id }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks across values that the schema cannot express, failing with a message naming the values.
*/}}
{{- define "x402.validate" -}}
{{- $v := .Values }}
{{- $k := $v.gateway.batch.receiverAuthorizerKey }}
{{- if and (include "x402.batchRoutes" .) (not (or $k.value (and $k.existingSecret $k.existingSecretKey))) }}
{{- fail "gateway.batch.receiverAuthorizerKey: a route offers batch-settlement; give existingSecret and existingSecretKey (or value)" }}
{{- end }}
{{- $mode := include "x402.facilitatorMode" . }}
{{- range $v.gateway.routes }}
{{- if not (hasKey $v.gateway.upstreams .upstream) }}
{{- fail (printf "gateway.routes: route %s %s names upstream %q, which is not in gateway.upstreams" (default "POST" .method) .path .upstream) }}
{{- end }}
{{- end }}
{{- range $name, $up := $v.gateway.upstreams }}
{{- if and $up.auth (not (or $up.auth.value (and $up.auth.existingSecret $up.auth.existingSecretKey))) }}
{{- fail (printf "gateway.upstreams.%s.auth: give existingSecret and existingSecretKey (or value)" $name) }}
{{- end }}
{{- end }}
{{- if and $v.gateway.budgets.enabled $v.gateway.budgets.adminToken.existingSecret (not $v.gateway.budgets.adminToken.existingSecretKey) }}
{{- fail "gateway.budgets.adminToken.existingSecretKey is required with existingSecret" }}
{{- end }}
{{- if and (eq $mode "external") $v.facilitator.external.authHeader (not (and $v.facilitator.external.existingSecret $v.facilitator.external.existingSecretKey)) }}
{{- fail "facilitator.external.authHeader needs existingSecret and existingSecretKey (the Secret holding the header's value)" }}
{{- end }}
{{- if ne $mode "external" }}
{{- if not $v.facilitator.networks }}
{{- fail "facilitator.networks: give one entry (network and RPC URL) per network in gateway.accepts" }}
{{- end }}
{{- $nets := list }}
{{- range $v.facilitator.networks }}{{ $nets = append $nets .network }}{{ end }}
{{- range $v.gateway.accepts }}
{{- if not (has .network $nets) }}
{{- fail (printf "gateway.accepts offers %s but facilitator.networks has no entry (RPC URL) for it" .network) }}
{{- end }}
{{- end }}
{{- if not (or $v.facilitator.signer.keys $v.facilitator.signer.existingSecret) }}
{{- fail "facilitator.signer: give existingSecret (a Secret with comma-separated keys under existingSecretKey) or keys" }}
{{- end }}
{{- /* Every facilitator process may sign with every key; their nonces are coordinated through the
       facilitator's store, so with more than one process that store must be Redis. The chart
       always points FACILITATOR_STORE_URL at its Redis; only an extraEnv override can change it. */}}
{{- $procs := 0 }}
{{- $what := "" }}
{{- $extraEnv := list }}
{{- if eq $mode "service" }}
{{- $procs = mul (add (int $v.facilitator.replicaCount) (int $v.facilitator.strategy.maxSurge)) (int $v.facilitator.workers) }}
{{- $what = printf "facilitator.extraEnv: %d facilitator processes ((replicaCount %d + strategy.maxSurge %d) x workers %d)" $procs (int $v.facilitator.replicaCount) (int $v.facilitator.strategy.maxSurge) (int $v.facilitator.workers) }}
{{- $extraEnv = $v.facilitator.extraEnv }}
{{- else }}
{{- $replicas := ternary (int $v.gateway.autoscaling.maxReplicas) (int $v.gateway.replicaCount) $v.gateway.autoscaling.enabled }}
{{- $procs = mul (add $replicas (int $v.gateway.strategy.maxSurge)) (int $v.gateway.workers) }}
{{- $what = printf "gateway.extraEnv: %d in-process facilitators (gateway (%s %d + strategy.maxSurge %d) x workers %d)" $procs (ternary "autoscaling.maxReplicas" "replicaCount" $v.gateway.autoscaling.enabled) $replicas (int $v.gateway.strategy.maxSurge) (int $v.gateway.workers) }}
{{- $extraEnv = $v.gateway.extraEnv }}
{{- end }}
{{- range $extraEnv }}
{{- if and (eq .name "FACILITATOR_STORE_URL") (not .valueFrom) (gt $procs 1) (not (regexMatch "^(rediss?|unix|rediss?\\+sentinel|rediss?\\+cluster)://" (toString (default "" .value)))) }}
{{- fail (printf "%s share the signer keys and coordinate their nonces through the facilitator's store, but FACILITATOR_STORE_URL is set to a store that is not Redis: remove the override (the chart points it at its Redis) or give a redis://, rediss://, redis+sentinel:// or redis+cluster:// URL" $what) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (ne $mode "external") (ge (float64 $v.facilitator.receiptTimeoutSeconds) (float64 $v.gateway.settleTimeoutSeconds)) }}
{{- fail "facilitator.receiptTimeoutSeconds must be shorter than gateway.settleTimeoutSeconds (the gateway would give up on a settlement before the facilitator answers)" }}
{{- end }}
{{- if eq $v.redis.mode "external" }}
{{- if not (or $v.redis.external.url (and $v.redis.external.existingSecret $v.redis.external.existingSecretUrlKey)) }}
{{- fail "redis.external.url is required with redis.mode=external (or existingSecret with existingSecretUrlKey)" }}
{{- end }}
{{- if and (eq $v.redis.external.topology "cluster") $v.redis.external.url (not (regexMatch "^rediss?://[^/]+(/0)?$" $v.redis.external.url)) }}
{{- fail "redis.external.url: Redis Cluster has only database 0" }}
{{- end }}
{{- if and (eq $v.redis.external.topology "sentinel") $v.redis.external.url (not (regexMatch "^rediss?://[^/]+/[^/]+(/[0-9]+)?$" $v.redis.external.url)) }}
{{- fail "redis.external.url: with topology sentinel give the Sentinels and the master's service name, e.g. redis://sentinel-0:26379,sentinel-1:26379/mymaster[/db]" }}
{{- end }}
{{- end }}
{{- if and $v.ingress.enabled (not $v.ingress.hosts) }}
{{- fail "ingress.hosts: give at least one host when ingress.enabled" }}
{{- end }}
{{- if and $v.gateway.autoscaling.enabled (lt (int $v.gateway.autoscaling.maxReplicas) (int $v.gateway.autoscaling.minReplicas)) }}
{{- fail "gateway.autoscaling.maxReplicas must be >= minReplicas" }}
{{- end }}
{{- if and $v.gateway.autoscaling.enabled (not (or $v.gateway.autoscaling.targetCPUUtilizationPercentage $v.gateway.autoscaling.targetMemoryUtilizationPercentage)) }}
{{- fail "gateway.autoscaling: set targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- if and $v.metrics.prometheusRule.enabled (not ($.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}
{{- fail "metrics.prometheusRule.enabled needs the monitoring.coreos.com/v1 API (install the Prometheus Operator CRDs, or pass --api-versions monitoring.coreos.com/v1 to helm template)" }}
{{- end }}
{{- end }}

{{/* Pod-level defaults: spread across nodes and zones unless the values say otherwise. */}}
{{- define "x402.topologySpread" -}}
{{- $root := index . 0 }}
{{- $component := index . 1 }}
{{- $given := index . 2 }}
{{- if $given }}
{{ toYaml $given }}
{{- else }}
{{- range list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
- maxSkew: 1
  topologyKey: {{ . }}
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "x402.componentSelectorLabels" (list $root $component) | nindent 6 }}
{{- end }}
{{- end }}
{{- end }}

{{- define "x402.scrapeAnnotations" -}}
{{- $root := index . 0 }}
{{- if and $root.Values.metrics.enabled (not (and $root.Values.metrics.serviceMonitor.enabled ($root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1"))) }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ index . 1 | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* HTTP probes on /healthz (liveness, startup) and /readyz (readiness). */}}
{{- define "x402.probes" -}}
{{- $p := . }}
livenessProbe:
  httpGet: {path: /healthz, port: http}
  {{- toYaml $p.liveness | nindent 2 }}
readinessProbe:
  httpGet: {path: /readyz, port: http}
  {{- toYaml $p.readiness | nindent 2 }}
startupProbe:
  httpGet: {path: /healthz, port: http}
  {{- toYaml $p.startup | nindent 2 }}
{{- end }}
