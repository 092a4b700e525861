"""Run first (then waves.py): loads the host-29 GQA replay (live no-LoRA) with per-step priced parts (host-29 profile)."""
import sys, pickle, os; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import *
RUN=MAIN+'/docs/fidelity/runs-21/host-28/call-2/fid-j/gqa-llama3-8b-s2-n100/load85'
LIVE=MAIN+'/docs/fidelity/runs-23/host-29/call-1/replay-gqa-llama3-8b-s2-n100-load85.csv.gz'
P29=MAIN+'/docs/fidelity/runs-23/host-29/call-2/profiles'
RUN7=MAIN+'/docs/fidelity/runs-21/host-28/call-2/fid-j/s2-n100/load85'
LIVE7=MAIN+'/docs/fidelity/runs-23/host-29/call-1/replay-s2-n100-load85.csv.gz'

def steps(run, live, profiles):
    rows = priced_steps(run, profiles); lv = read_csv(live)
    assert len(rows) == len(lv)
    out = []
    for r, l in zip(rows, lv):
        if int(r['prefill_tokens']) != 0 or int(r['decode_requests']) == 0: continue
        ctx = contexts_of(r); assert ctx == contexts_of(l)
        parts = {k: float(r[k]) for k in model_parts(r)}
        out.append(dict(step=int(r['step']), ctx=ctx, n=len(ctx), parts=parts,
                        live=float(l['executed_no_lora_s']), recorded=float(l['executed_recorded_s'])))
    return out

if __name__ == '__main__':
    d = {'gqa': steps(RUN, LIVE, P29), 'mha': steps(RUN7, LIVE7, P29)}
    pickle.dump(d, open(os.path.join(WORK, 'steps.pkl'), 'wb'))
    for k, v in d.items(): print(k, len(v))
