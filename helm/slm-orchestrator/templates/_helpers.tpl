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
