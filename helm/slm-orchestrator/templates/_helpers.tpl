{{/*
Names and labels. Every helper is namespaced by the chart name.
*/}}
{{- define "slm-orchestrator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "slm-orchestrator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "slm-orchestrator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "slm-orchestrator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "slm-orchestrator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "slm-orchestrator.labels" -}}
{{ include "slm-orchestrator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: {{ .Chart.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "slm-orchestrator.chart" . }}
{{- end }}

{{/* Labels with a component: (dict "root" $ "component" "head") */}}
{{- define "slm-orchestrator.componentLabels" -}}
{{ include "slm-orchestrator.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "slm-orchestrator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "slm-orchestrator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "slm-orchestrator.image" -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion .Values.engine) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "slm-orchestrator.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "slm-orchestrator.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{/*
The fleet spec's defaults (files/fleet-defaults.json, generated from the Python spec, which
is their only definition), so the chart never restates them.
*/}}
{{- define "slm-orchestrator.modelDefaults" -}}
{{- $model := (.Files.Get "files/fleet-defaults.json" | fromJson).model }}
{{- dict "min_replicas" $model.autoscaling.min_replicas "max_replicas" $model.autoscaling.max_replicas "target_queue_depth" $model.autoscaling.target_queue_depth "num_cpus" $model.resources.num_cpus "accelerator" $model.resources.accelerator | toJson }}
{{- end }}

{{/*
A name's slug (orchestrator.names._slug): (dict "name" NAME "disallowed" REGEX). Disallowed
characters become `-`; when any was replaced, the first 6 hex digits of the name's SHA-1
keep distinct names distinct.
*/}}
{{- define "slm-orchestrator.slug" -}}
{{- $slug := regexReplaceAll .disallowed .name "-" -}}
{{- if ne $slug .name }}{{ $slug = printf "%s-%s" $slug (sha1sum .name | trunc 6) }}{{ end -}}
{{- $slug -}}
{{- end }}

{{/* The Serve deployment of a model's replicas (orchestrator.names.deployment_name). */}}
{{- define "slm-orchestrator.deploymentName" -}}
model-{{ include "slm-orchestrator.slug" (dict "name" . "disallowed" "[^A-Za-z0-9_-]") }}
{{- end }}

{{/*
The fleet's Serve applications as serveConfigV2 entries, a JSON list: what
orchestrator.app.applications gives for the same fleet (a test compares them):
(dict "root" $ "fleet" FLEET). The gateway's application comes first, then one per fast-lane model.

LoRA adapters are taken out of every model and go into the applications' `deployments`
overrides as user_config (Serve hashes args into the code version, so adapters in args would
restart every replica; a changed user_config only reconfigures the running ones):
- gateway: {adapters: [{name, base, limits}]}, every adapter of the fleet (limits null unless set);
- each model's deployment: {adapters: [{name, source, limits?}]}, its own (an empty list without).
A model with adapters gets the LoRA engine arguments its engine leaves unset
(orchestrator.adapters.lora_engine_args): enable_lora, max_loras and max_cpu_loras as in
Python, and max_lora_rank the default (16): unlike `slm render`, the chart cannot read a
local adapter's rank, so a model with adapters of a higher rank sets engine.max_lora_rank.
*/}}
{{- define "slm-orchestrator.applications" -}}
{{- $fleet := deepCopy .fleet -}}
{{- $lora := (.root.Files.Get "files/fleet-defaults.json" | fromJson).lora -}}
{{- $models := get $fleet "models" | default list -}}
{{- $gatewayAdapters := list -}}
{{- $modelAdapters := list -}}
{{- range $model := $models -}}
{{- $adapters := list -}}
{{- range $a := (get $model "adapters" | default list) -}}
{{- $limits := dict -}}
{{- $hasLimits := and (hasKey $a "limits") (kindIs "map" $a.limits) -}}
{{- if $hasLimits -}}
{{- range $k, $v := $a.limits }}{{ if not (kindIs "invalid" $v) }}{{ $_ := set $limits $k $v }}{{ end }}{{ end -}}
{{- end -}}
{{- $entry := dict "name" $a.name "source" $a.source -}}
{{- if $hasLimits }}{{ $_ := set $entry "limits" $limits }}{{ end -}}
{{- $adapters = append $adapters $entry -}}
{{- $gatewayAdapters = append $gatewayAdapters (dict "name" $a.name "base" $model.name "limits" (ternary $limits nil $hasLimits)) -}}
{{- end -}}
{{- if $adapters -}}
{{- $engine := get $model "engine" | default dict -}}
{{- $slots := $lora.max_loras -}}
{{- if hasKey $engine "max_loras" -}}
{{- $slots = 0 -}}
{{- $given := $engine.max_loras -}}
{{- if and (kindIs "float64" $given) (eq $given (floor $given)) }}{{ $slots = $given }}{{ end -}}
{{- if or (kindIs "int" $given) (kindIs "int64" $given) }}{{ $slots = $given }}{{ end -}}
{{- end -}}
{{- $derived := dict
    "enable_lora" true
    "max_lora_rank" $lora.max_lora_rank
    "max_loras" $lora.max_loras
    "max_cpu_loras" (max (int64 $lora.max_cpu_loras) (len $adapters) (int64 $slots)) -}}
{{- range $key, $value := $derived -}}
{{- if not (hasKey $engine $key) }}{{ $_ := set $engine $key $value }}{{ end -}}
{{- end -}}
{{- $_ := set $model "engine" $engine -}}
{{- end -}}
{{- $_ := unset $model "adapters" -}}
{{- $modelAdapters = append $modelAdapters $adapters -}}
{{- end -}}
{{- $main := list (dict "name" "gateway" "user_config" (dict "adapters" $gatewayAdapters)) -}}
{{- $lanes := list -}}
{{- range $i, $model := $models -}}
{{- $deployment := dict "name" (include "slm-orchestrator.deploymentName" $model.name) "user_config" (dict "adapters" (index $modelAdapters $i)) -}}
{{- if eq (toString (get $model "fast_lane")) "true" -}}
{{- $slug := include "slm-orchestrator.slug" (dict "name" $model.name "disallowed" "[^A-Za-z0-9._-]") -}}
{{- $lanes = append $lanes (dict
    "name" (printf "slm-lane-%s" $slug)
    "route_prefix" (printf "/models/%s" $slug)
    "import_path" "orchestrator.app:build_lane_app"
    "args" (dict "fleet" $fleet "model" $model.name)
    "deployments" (list $deployment)) -}}
{{- else -}}
{{- $main = append $main $deployment -}}
{{- end -}}
{{- end -}}
{{- $app := dict "name" "slm" "route_prefix" "/" "import_path" "orchestrator.app:build_app" "args" $fleet "deployments" $main -}}
{{- prepend $lanes $app | toJson -}}
{{- end }}

{{/*
The fleet's models with the fields the chart sizes pods from, defaults filled in:
a JSON list of {name, placement (cpu|gpu), gpus, gpuType, min, max, target, numCpus}.
*/}}
{{- define "slm-orchestrator.models" -}}
{{- $defaults := include "slm-orchestrator.modelDefaults" . | fromJson }}
{{- $out := list }}
{{- range $i, $m := .Values.fleet.models }}
{{- $res := $m.resources | default dict }}
{{- $scaling := $m.autoscaling | default dict }}
{{- $engine := $m.engine | default dict }}
{{- $placement := ternary $res.accelerator $defaults.accelerator (hasKey $res "accelerator") }}
{{- if eq $placement "auto" }}{{ $placement = $.Values.engine }}{{ end }}
{{- $gpus := ternary $engine.tensor_parallel_size 1 (hasKey $engine "tensor_parallel_size") | int }}
{{- $gpuType := "" }}
{{- if and (hasKey $res "accelerator_type") $res.accelerator_type }}{{ $gpuType = $res.accelerator_type }}{{ end }}
{{- $min := ternary $scaling.min_replicas $defaults.min_replicas (hasKey $scaling "min_replicas") | int }}
{{- $max := ternary $scaling.max_replicas $defaults.max_replicas (hasKey $scaling "max_replicas") | int }}
{{- $target := ternary $scaling.target_queue_depth $defaults.target_queue_depth (hasKey $scaling "target_queue_depth") | float64 }}
{{- $numCpus := ternary $res.num_cpus $defaults.num_cpus (hasKey $res "num_cpus") | float64 }}
{{- if and (eq $placement "cpu") (gt $numCpus (float64 $.Values.workers.cpu.rayCpus)) }}
{{- fail (printf "fleet.models[%d] (%s): resources.num_cpus %v is more than a CPU worker pod offers (workers.cpu.rayCpus %v)" $i $m.name $numCpus $.Values.workers.cpu.rayCpus) }}
{{- end }}
{{- $share := 1.0 }}
{{- if and (hasKey $res "num_gpus") $res.num_gpus (eq $gpus 1) }}{{ $share = $res.num_gpus | float64 }}{{ end }}
{{- $out = append $out (dict "name" $m.name "placement" $placement "gpus" $gpus "gpuType" $gpuType "min" $min "max" $max "target" $target "share" $share) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
Worker groups sized from the fleet: one per pod shape (GPUs per replica, GPU type) plus one
for CPU models; pods summed over the models that share the shape, a replica with a GPU
share below 1 (resources.num_gpus) counting as that share of a pod.
A JSON list of {name, gpus, gpuType, min, max}, sorted by name.
*/}}
{{- define "slm-orchestrator.workerGroups" -}}
{{- $groups := dict }}
{{- range $m := include "slm-orchestrator.models" . | fromJsonArray }}
{{- $key := "cpu" }}
{{- $gpus := 0 }}
{{- if eq $m.placement "gpu" }}
{{- $gpus = $m.gpus | int }}
{{- $key = printf "gpu-x%d" $gpus }}
{{- if $m.gpuType }}{{ $key = printf "%s-%s" $key (lower $m.gpuType) }}{{ end }}
{{- end }}
{{- $g := get $groups $key | default (dict "name" $key "gpus" $gpus "gpuType" (ternary $m.gpuType "" (eq $m.placement "gpu")) "min" 0.0 "max" 0.0) }}
{{- $share := ternary $m.share 1.0 (eq $m.placement "gpu") }}
{{- $_ := set $g "min" (addf $g.min (mulf $m.min $share)) }}
{{- $_ := set $g "max" (addf $g.max (mulf $m.max $share)) }}
{{- $_ := set $groups $key $g }}
{{- end }}
{{- $out := list }}
{{- range $key := keys $groups | sortAlpha }}
{{- $g := get $groups $key }}
{{- $_ := set $g "min" (ceil (subf $g.min 0.000001) | int) }}
{{- $_ := set $g "max" (ceil (subf $g.max 0.000001) | int) }}
{{- $out = append $out $g }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Environment of every Ray container. */}}
{{- define "slm-orchestrator.env" -}}
- name: HOME
  value: /home/slm
- name: SLM_CACHE_DIR
  value: /models/slm
- name: HF_HOME
  value: /models/huggingface
{{- /* Serve's HTTP middleware hook: the gateway bounds what it reflects of x-request-id. */}}
- name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
  value: orchestrator.gateway.http:serve_middlewares
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "slm-orchestrator.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/slm
- name: dshm
  mountPath: /dev/shm
- name: models
  mountPath: /models
{{- if .Values.apiKeys.enabled }}
- name: api-keys
  mountPath: /etc/slm
  readOnly: true
{{- end }}
{{- end }}

{{- define "slm-orchestrator.volumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
- name: models
{{- if .Values.modelCache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.modelCache.existingClaim }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- if .Values.apiKeys.enabled }}
- name: api-keys
  secret:
    secretName: {{ include "slm-orchestrator.apiKeysSecret" . }}
    items:
      - key: {{ .Values.apiKeys.secretKey }}
        path: keys.yaml
{{- end }}
{{- end }}

{{/*
A Ray pod template: (dict "root" $ "component" "head|worker" "container" DICT "scheduling" DICT)
*/}}
{{- define "slm-orchestrator.podTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "slm-orchestrator.componentLabels" (dict "root" $root "component" .component) | nindent 4 }}
spec:
  serviceAccountName: {{ include "slm-orchestrator.serviceAccountName" $root }}
  {{- if ne .component "head" }}
  # Only the head pod's autoscaler sidecar talks to the Kubernetes API (KubeRay binds its Role
  # to this ServiceAccount); workers get no token.
  automountServiceAccountToken: false
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" (eq .component "head") }}
      image: {{ include "slm-orchestrator.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      env:
        {{- include "slm-orchestrator.env" $root | nindent 8 }}
      {{- with $root.Values.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "slm-orchestrator.volumeMounts" $root | nindent 8 }}
      {{- toYaml .container | nindent 6 }}
  volumes:
    {{- include "slm-orchestrator.volumes" $root | nindent 4 }}
  {{- with .scheduling }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
