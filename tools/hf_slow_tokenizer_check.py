#!/usr/bin/env python3
"""What transformers makes of tokenizers saved as slow files only (vocab.json + merges.txt, no
tokenizer.json): the reference for tests/model/tokenizer_slow_files_test.cc; and of
tokenizer_config.json added_tokens_decoder entries that tokenizer.json lacks (the reference for
AddedTokensDecoder.* in tests/model/tokenizer_special_tokens_test.cc). Needs transformers
and tokenizers (no torch), e.g. `pip install transformers==4.46.3 tokenizers==0.20.3 protobuf`;
also runs under transformers 5 (the device machine's 5.17). The two versions agree on every case
here but merges.txt without its "#version" header or final newline ("nohdr", "nofinalnl"):
4.46 drops the file's first / unterminated last line, 5.17 reads every line but the header,
which is what phishard follows (2026-11-29, perf-log 18:53 / 18:55).
Run from the repository root: python3 tools/hf_slow_tokenizer_check.py
Prints, for testdata/tokenizers/{phi-2,gpt2} written out as slow files, the mismatches against
their golden vectors, then the ids of the test's small cases."""
import json, os, shutil, tempfile, glob
import transformers
try:
    from transformers import CodeGenTokenizerFast
except ImportError:  # transformers 5: one tokenizers-backed class a model
    from transformers import CodeGenTokenizer as CodeGenTokenizerFast
print('transformers', transformers.__version__)
src=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'testdata', 'tokenizers')
def slow_copy(name, copies):
    d=tempfile.mkdtemp()
    tj=json.load(open(f'{src}/{name}/tokenizer.json'))
    json.dump(tj['model']['vocab'], open(f'{d}/vocab.json','w'))
    with open(f'{d}/merges.txt','w') as f:
        f.write('#version: 0.2\n')
        for m in tj['model']['merges']:
            f.write((m if isinstance(m,str) else ' '.join(m))+'\n')
    for c in copies: shutil.copy(f'{src}/{name}/{c}', d)
    return d
for name, copies in [('phi-2',['added_tokens.json','tokenizer_config.json','special_tokens_map.json']),('gpt2',[])]:
    d=slow_copy(name,copies)
    tok=CodeGenTokenizerFast.from_pretrained(d)
    bad=n=0
    for f in glob.glob(f'{src}/{name}/vectors/*.jsonl'):
        for line in open(f):
            if not line.strip(): continue
            v=json.loads(line); t=v['text']
            if v.get('add_prefix_space'): t=' '+t
            ids=tok(t, add_special_tokens=False)['input_ids']
            n+=1
            if ids!=v['ids']: bad+=1; print(name,'MISMATCH',repr(t)[:60], ids[:10], v['ids'][:10])
    print(name, 'vectors', n, 'mismatches', bad, 'eos', tok.eos_token_id, 'vocab', len(tok), tok.encode('<|endoftext|> Hello'), tok.encode('a    b'))
# small cases
d=tempfile.mkdtemp()
json.dump({"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġa": 4, "<s>": 5}, open(f'{d}/vocab.json','w'))
def small(merges, cfg=None, added=None):
    open(f'{d}/merges.txt','w').write(merges)
    for fn in ['tokenizer_config.json','added_tokens.json','tokenizer.json']:
        if os.path.exists(f'{d}/{fn}'): os.remove(f'{d}/{fn}')
    if cfg: json.dump(cfg, open(f'{d}/tokenizer_config.json','w'))
    if added: json.dump(added, open(f'{d}/added_tokens.json','w'))
    return CodeGenTokenizerFast.from_pretrained(d)
print('hdr', small('#version: 0.2\na b\r\nĠ a\n').encode('ab a'))
print('nohdr', small('a b\nĠ a\n').encode('ab a'))
print('nofinalnl', small('#version: 0.2\na b\nĠ a').encode('ab a'))
print('prefix', small('#version: 0.2\na b\nĠ a\n', {"add_prefix_space": True}).encode('a'))
t=small('#version: 0.2\na b\nĠ a\n', {"eos_token": "<e>"}, {"<e>": 6, "bb": 7})
print('added', t.encode('abb<e>', add_special_tokens=False), t.all_special_ids, t.eos_token_id)
t=small('#version: 0.2\na b\nĠ a\n', {"added_tokens_decoder": {}}, {"bb": 7})
print('decoder_present', t.encode('bb', add_special_tokens=False))
t=small('#version: 0.2\na b\nĠ a\n', None, {"<|endoftext|>": 6})
print('default_in_added', t.encode('<|endoftext|>', add_special_tokens=False), t.all_special_ids, t.convert_ids_to_tokens(6), 6 in t.all_special_ids)
print('default_in_added_decode_skip', repr(t.decode([6, 0], skip_special_tokens=True)), t.added_tokens_decoder[6].special, 'eos', t.eos_token_id)

# added_tokens_decoder entries tokenizer.json lacks (phi-2's files plus four entries)
d=tempfile.mkdtemp()
for f in ['tokenizer.json','tokenizer_config.json','special_tokens_map.json']: shutil.copy(f'{src}/phi-2/{f}', d)
c=json.load(open(f'{d}/tokenizer_config.json'))
flags={"lstrip":False,"normalized":False,"rstrip":False,"single_word":False,"special":True}
c['added_tokens_decoder']['50400']=dict(flags, content='<new1>')
c['added_tokens_decoder']['50300']=dict(flags, content='<new0>')
c['added_tokens_decoder']['50500']=dict(flags, content='Hello')
c['added_tokens_decoder']['50600']=dict(flags, content='<|endoftext|>', special=False)
json.dump(c, open(f'{d}/tokenizer_config.json','w'))
t=CodeGenTokenizerFast.from_pretrained(d)
print('decoder entries', t.encode('<new0>'), t.encode('<new1>'), t.encode('Hello'), t.encode('<|endoftext|>'), len(t),
      repr(t.decode([50256, 15496], skip_special_tokens=True)), repr(t.decode([50295, 64], skip_special_tokens=True)), t.eos_token_id)
# added_tokens.json with ids that skip numbers, and one that is a vocabulary token
d=tempfile.mkdtemp()
json.dump({"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġa": 4, "<s>": 5}, open(f'{d}/vocab.json','w'))
open(f'{d}/merges.txt','w').write('#version: 0.2\na b\nĠ a\n')
json.dump({"<y>": 20, "<x>": 10, "ab": 30}, open(f'{d}/added_tokens.json','w'))
t=CodeGenTokenizerFast.from_pretrained(d)
print('skipping ids', t.encode('<x>', add_special_tokens=False), t.encode('<y>', add_special_tokens=False), t.encode('ab', add_special_tokens=False), len(t), t.eos_token_id)
# such an entry marked not special but named as the eos
d=tempfile.mkdtemp()
for f in ['tokenizer.json','tokenizer_config.json']: shutil.copy(f'{src}/phi-2/{f}', d)
c=json.load(open(f'{d}/tokenizer_config.json'))
c['added_tokens_decoder']['50300']=dict(flags, content='<x>', special=False)
c['eos_token']='<x>'
json.dump(c, open(f'{d}/tokenizer_config.json','w'))
t=CodeGenTokenizerFast.from_pretrained(d)
print('named decoder entry', t.encode('<x>'), t.eos_token_id, t.added_tokens_decoder[t.eos_token_id].special, repr(t.decode([t.eos_token_id, 64], skip_special_tokens=True)))
