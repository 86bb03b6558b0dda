{{/* Names and labels shared by every template. */}}

{{- define "fleetserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleetserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "fleetserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fleetserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one component's objects. */}}
{{- define "fleetserve.labels" -}}
{{ include "fleetserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: fleetserve
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* One model's engine: its object name and selector labels ((dict "root" $ "model" $m)). */}}
{{- define "fleetserve.engineName" -}}
{{- printf "%s-engine-%s" (include "fleetserve.fullname" .root) .model.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleetserve.engineSelectorLabels" -}}
{{ include "fleetserve.selectorLabels" (dict "root" .root "component" "engine") }}
fleetserve.dev/model: {{ .model.name }}
{{- end -}}

{{- define "fleetserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Whether a model is scaled by the fleetserve autoscaler. */}}
{{- define "fleetserve.autoscaled" -}}
{{- if and (eq .root.Values.autoscaler.mode "fleetserve") .model.autoscale -}}true{{- end -}}
{{- end -}}

{{- define "fleetserve.secretName" -}}
{{- default (printf "%s-gateway" (include "fleetserve.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* The restricted Pod Security profile: the pod's part and the container's part. */}}
{{- define "fleetserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fleetserve.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .readOnly }}
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Spread over zones and nodes, preferred (ScheduleAnyway): (dict "labels" ...). */}}
{{- define "fleetserve.topologySpread" -}}
- maxSkew: 1
  topologyKey: topology.kubernetes.io/zone
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- .labels | nindent 6 }}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- .labels | nindent 6 }}
{{- end -}}

{{/* The URL of the gateway Service inside the cluster. */}}
{{- define "fleetserve.gatewayUrl" -}}
{{- printf "http://%s-gateway.%s.svc:%d" (include "fleetserve.fullname" .) .Release.Namespace (int .Values.gateway.port) -}}
{{- end -}}

{{/* The models the fleetserve autoscaler scales (a list of model dicts). */}}
{{- define "fleetserve.autoscaledModels" -}}
{{- $out := list -}}
{{- range include "fleetserve.models" . | fromJsonArray -}}
{{- if include "fleetserve.autoscaled" (dict "root" $ "model" .) -}}
{{- $out = append $out .name -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Egress every fleetserve pod needs: DNS (kube-dns / CoreDNS in any namespace). */}}
{{- define "fleetserve.egressDNS" -}}
- to:
    - namespaceSelector: {}
      podSelector:
        matchLabels:
          k8s-app: kube-dns
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- end -}}

{{- define "fleetserve.egressAPIServer" -}}
- to:
    {{- range .Values.networkPolicy.apiServerCIDRs }}
    - ipBlock: {cidr: {{ . }}}
    {{- end }}
  ports:
    - {protocol: TCP, port: 443}
    - {protocol: TCP, port: 6443}
{{- end -}}

{{/* The models, each with modelDefaults filled in (JSON; read with fromJsonArray). A key the
model gives replaces the default (false and 0 included); `cache` is merged key by key. */}}
{{- define "fleetserve.models" -}}
{{- $out := list -}}
{{- range .Values.models -}}
{{- $m := deepCopy $.Values.modelDefaults -}}
{{- range $k, $v := . -}}
{{- if eq $k "cache" -}}
{{- $cache := deepCopy (get $m "cache" | default dict) -}}
{{- range $k2, $v2 := $v }}{{- $_ := set $cache $k2 $v2 -}}{{- end -}}
{{- $_ := set $m "cache" $cache -}}
{{- else -}}
{{- $_ := set $m $k $v -}}
{{- end -}}
{{- end -}}
{{- $out = append $out $m -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}
