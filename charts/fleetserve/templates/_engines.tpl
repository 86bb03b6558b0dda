{{/* Engine containers: the arguments, environment and preStop of each engine kind.
Each takes (dict "root" $ "model" $m). */}}

{{- define "fleetserve.engine.port" -}}
{{- if eq .model.engine "vllm" }}{{ .root.Values.engines.vllm.port }}{{ else }}{{ .root.Values.engines.llamacpp.port }}{{ end -}}
{{- end -}}

{{- define "fleetserve.engine.image" -}}
{{- $img := get .root.Values.engines .model.engine | dig "image" dict -}}
{{- printf "%s:%s" $img.repository $img.tag -}}
{{- end -}}

{{- define "fleetserve.engine.args" -}}
{{- $m := .model -}}
{{- $port := include "fleetserve.engine.port" . -}}
{{- $src := $m.source | default dict -}}
{{- $hf := $src.huggingFace | default dict -}}
{{- if eq $m.engine "vllm" }}
- {{ ternary (printf "/models/%s" $src.path) $hf.id (not (empty $src.path)) | quote }}
- --served-model-name={{ $m.name }}
- --host=0.0.0.0
- --port={{ $port }}
{{- if and $hf.revision (empty $src.path) }}
- --revision={{ $hf.revision }}
{{- end }}
{{- else }}
- --host=0.0.0.0
- --port={{ $port }}
- --metrics
- --alias={{ $m.name }}
{{- if $src.path }}
- --model=/models/{{ $src.path }}
{{- else }}
- --hf-repo={{ required (printf "models[%s].source.huggingFace.id (or source.path) is required" $m.name) $hf.id }}{{ with $hf.revision }}:{{ . }}{{ end }}
- --hf-file={{ required (printf "models[%s].source.huggingFace.file: llama.cpp needs the GGUF file in the repository" $m.name) $hf.file }}
{{- end }}
{{- end }}
{{- range $m.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "fleetserve.engine.env" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: HF_HOME
  value: /models/huggingface
{{- if eq .model.engine "vllm" }}
- name: VLLM_CACHE_ROOT
  value: /tmp/vllm
- name: TRITON_CACHE_DIR
  value: /tmp/triton
{{- else }}
- name: LLAMA_CACHE
  value: /models/llama.cpp
{{- end }}
{{- with .root.Values.huggingFace.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $.root.Values.huggingFace.tokenSecretKey }}}
{{- end }}
{{- with .model.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* preStop: wait endpointDelaySeconds for the EndpointSlice to drop the pod (the gateway stops
sending to it), then until the engine runs no request; all within drainGraceSeconds. */}}
{{- define "fleetserve.engine.preStop" -}}
{{- $port := include "fleetserve.engine.port" . -}}
{{- $grace := int .model.drainGraceSeconds -}}
{{- $delay := int .model.endpointDelaySeconds -}}
{{- if eq .model.engine "vllm" }}
- python3
- -c
- |
  import time, urllib.request
  deadline = time.monotonic() + {{ $grace }}
  time.sleep({{ $delay }})
  while time.monotonic() < deadline:
      try:
          text = urllib.request.urlopen("http://127.0.0.1:{{ $port }}/metrics", timeout=2).read().decode()
      except OSError:
          break
      running = sum(float(line.rsplit(" ", 1)[-1]) for line in text.splitlines()
                    if line.startswith("vllm:num_requests_running"))
      if running == 0:
          break
      time.sleep(1)
{{- else }}
- /bin/sh
- -c
- |
  end=$(( $(date +%s) + {{ $grace }} ))
  sleep {{ $delay }}
  while [ "$(date +%s)" -lt "$end" ]; do
    n=$(curl -sf --max-time 2 http://127.0.0.1:{{ $port }}/metrics | awk '/^llamacpp:requests_processing/ {s += $2} END {print s + 0}') || break
    [ "$n" = 0 ] && break
    sleep 1
  done
{{- end }}
{{- end -}}
