# bench/dev/emulate_wy_two_blocks.py: a review aid for the two-blocks WY backward kernel (session 20 candidate, merged in session 21). It mirrors,
# by hand, that candidate WY backward kernel's thread maps (lanes, warps, mma.sync m16n8k8 fragments, shared-memory
# offsets, buffers refilled with NaN when reused) in float64 for one chunk (T ending at row 50, a document
# starting at row 40) and compares PDQ, PDK, DA, del, PDK2, dv, DL and dbeta with the plain math. It does not read
# the .cu file: after a change to the kernel it must be changed with it. Usage: python3 bench/dev/emulate_wy_two_blocks.py 128,128 48,32 ...
import numpy as np, sys
from mma_m16n8k8 import mma  # bench/dev/mma_m16n8k8.py
CH=64; NT=256; SLD=20; CLD=68
SP_STAGE=5*64*SLD+64*16//2; SP_STAGES=2
DXP,XP,YP,KVP,KKP,MTP=40,36,36,40,72,68
WY_PANEL=CH*DXP+CH*XP+CH*KVP//2; WY_MT=2*WY_PANEL+CH*YP
def run(K,V,T_rows,seg,fixed=False):
    rng=np.random.default_rng(K*1000+V)
    dO=rng.standard_normal((CH,V)); dO[T_rows:]=rng.standard_normal((CH-T_rows,V))  # rows past T: kernel zero-fills
    VP=rng.standard_normal((CH,V)); DVP=rng.standard_normal((CH,V))
    S0=rng.standard_normal((K,V)); DS=rng.standard_normal((K,V))
    MT=rng.standard_normal((CH,CH)); W=rng.standard_normal((CH,K)); U=rng.standard_normal((CH,V))
    KK=rng.standard_normal((CH,CH)); kraw=rng.standard_normal((CH,K)); vraw=rng.standard_normal((CH,V))
    rk=rng.uniform(0.5,2,CH); gc=np.cumsum(-rng.uniform(0,0.1,(CH,K)),0); beta=rng.uniform(0,1,CH)
    beta[T_rows:]=0
    dOz=dO.copy(); dOz[T_rows:]=0; kz=kraw.copy(); kz[T_rows:]=0; vz=vraw.copy(); vz[T_rows:]=0
    last=seg[CH-1]
    # reference
    P0=dOz@S0.T; P1=VP@DS.T; P2=DVP@S0.T; P3=dOz@VP.T
    ref={}
    ref['PDQ']=np.where((seg==0)[:,None],np.exp(gc)*P0,0)
    ref['PDK']=np.where((seg==last)[:,None],np.exp(gc[-1][None,:]-gc)*P1,0)
    ii,jj=np.meshgrid(range(CH),range(CH),indexing='ij')
    ref['DA']=np.where((jj<=ii)&(seg[:,None]==seg[None,:]),P3,0)
    ref['del']=(DS*S0).sum(1)
    dX=np.concatenate([-P2,DVP],1); Y=MT@dX
    eg=np.where((seg==0)[:,None],np.exp(gc),0)
    ref['PDK2']=eg*beta[:,None]*Y[:,:K]
    ref['dv']=(beta[:,None]*Y[:,K:])[:T_rows]
    X=np.concatenate([W,U],1)
    dL=np.where((jj<ii)&(seg[:,None]==seg[None,:]),-(Y@X.T),0); ref['DL']=dL
    rhs=np.concatenate([kz*rk[:,None]*eg,vz],1)
    ref['dbeta']=((Y*rhs).sum(1)+(dL*KK).sum(1))[:T_rows]
    # ---- emulation ----
    out={k:np.full(v.shape,np.nan) for k,v in ref.items()}
    out['DXK']=np.full((CH,K),np.nan)
    smem=np.full(WY_MT+CH*MTP,np.nan)
    for e in range(CH*CH//4):
        d=WY_MT+(e>>4)*MTP+4*(e&15); smem[d:d+4]=MT.reshape(-1)[4*e:4*e+4]
    # phase 1
    nv=V//16; ns=(K+63)//64*nv
    acc=None; dl=np.zeros(NT); delS=np.full(K,np.nan)
    for s in range(ns):
        n0=64*(s//nv); k0=16*(s%nv); cols=min(64,K-n0); st=(s%SP_STAGES)*SP_STAGE
        if k0==0:
            acc=[[[[0.0]*4 for nt in range(4)] for p in range(4)] for w in range(8*32)]
            acc=np.zeros((8,32,4,4,4)); dl[:]=0
        for tid in range(NT):
            pr=(tid&7)+8*(tid>>5); pc=4*((tid>>3)&3); row_in=n0+pr<K
            smem[st+(64+pr)*SLD+pc:][:4]=VP[pr,k0+pc:k0+pc+4]
            smem[st+(128+pr)*SLD+pc:][:4]=DVP[pr,k0+pc:k0+pc+4]
            smem[st+(192+pr)*SLD+pc:][:4]=S0[n0+pr,k0+pc:k0+pc+4] if row_in else 0
            smem[st+(256+pr)*SLD+pc:][:4]=DS[n0+pr,k0+pc:k0+pc+4] if row_in else 0
        for tid in range(NT):
            pr=(tid&7)+8*(tid>>5); pc=4*((tid>>3)&3)
            x=smem[st+(192+pr)*SLD+pc:][:4]; y=smem[st+(256+pr)*SLD+pc:][:4]
            dl[tid]+=(x*y).sum()
            if tid<128:
                dr=(tid&127)>>1; dc=8*(tid&1)
                smem[st+dr*SLD+dc:][:8]=dOz[dr,k0+dc:k0+dc+8]
        for w in range(8):
            wm,wn=w>>1,w&1
            def A(off,ks):  # frag_a at As + off*SLD + ks
                return [[smem[st+(16*wm+g+off)*SLD+t+ks],smem[st+(16*wm+g+8+off)*SLD+t+ks],smem[st+(16*wm+g+off)*SLD+t+ks+4],smem[st+(16*wm+g+8+off)*SLD+t+ks+4]] for l in range(32) for g,t in [(l>>2,l&3)]]
            def Bm(off,nt,ks):
                return [[smem[st+(off+32*wn+g+8*nt)*SLD+t+ks],smem[st+(off+32*wn+g+8*nt)*SLD+t+ks+4]] for l in range(32) for g,t in [(l>>2,l&3)]]
            if 32*wn<cols:
                for ks in (0,8):
                    for nt in range(4):
                        for p,(ao,bo) in enumerate([(0,192),(64,256),(128,192)]):
                            acc[w,:,p,nt]=mma(A(ao,ks),Bm(bo,nt,ks),acc[w,:,p,nt])
            if n0==0:
                for ks in (0,8):
                    for nt in range(4): acc[w,:,3,nt]=mma(A(0,ks),Bm(64,nt,ks),acc[w,:,3,nt])
        if k0+16<V: continue
        for tid in range(NT):
            pr=(tid&7)+8*(tid>>5); pc=4*((tid>>3)&3)
            w=tid>>5; lane=tid&31
            tot=sum(dl[(w<<5)+(lane^m)] for m in (0,8,16,24))
            if pc==0 and pr<cols: delS[n0+pr]=tot
        Cs=st
        for p in range(4):
            if p==3 and n0!=0: break
            smem[Cs:Cs+64*CLD]=np.nan
            for w in range(8):
                wm,wn=w>>1,w&1
                if p==3 or 32*wn<cols:
                    for l in range(32):
                        g,t=l>>2,l&3; base=Cs+16*wm*CLD+32*wn
                        for nt in range(4):
                            c=acc[w,l,p,nt]
                            smem[base+g*CLD+8*nt+2*t:][:2]=c[0:2]; smem[base+(g+8)*CLD+8*nt+2*t:][:2]=c[2:4]
            for tid in range(NT):
                tx,ty=tid&15,tid>>4
                for r in range(4):
                    for q in range(4):
                        if p==3 or tx+16*q<cols:
                            i=ty+16*r; n=n0+tx+16*q; x=smem[Cs+i*CLD+tx+16*q]
                            if p==0: out['PDQ'][i,n]=np.exp(gc[i,n])*x if seg[i]==0 else 0
                            elif p==1: out['PDK'][i,n]=np.exp(gc[-1,n]-gc[i,n])*x if seg[i]==last else 0
                            elif p==2: out['DXK'][i,n]=-x
                            else: out['DA'][i,n]=x if (n<=i and seg[i]==seg[n]) else 0
    out['del']=delS
    # phase 2
    smem[:2*WY_PANEL+CH*YP]=np.nan
    mta=np.zeros((8,32,8,4))
    for w in range(8):
        wm=w>>1
        for l in range(32):
            gq,t=l>>2,l&3
            m0=WY_MT+(16*wm+gq)*MTP+t; m8=m0+8*MTP
            for ks in range(8): mta[w,l,ks]=[smem[m0+8*ks],smem[m8+8*ks],smem[m0+8*ks+4],smem[m8+8*ks+4]]
    KV=K+V; np_=(KV+31)//32
    width=lambda p: 32 if fixed else min(32,KV-32*p)
    kvs_store={}
    def issue(p):
        dxs=(p&1)*WY_PANEL; xs=dxs+CH*DXP; c0=32*p; pw=width(p); sh=3 if pw==32 else 2
        smem[dxs:dxs+WY_PANEL]=np.nan
        for e in range(CH*pw//4):
            i=e>>sh; cl=4*(e&((1<<sh)-1)); a=c0+cl
            smem[dxs+i*DXP+cl:][:4]=out['DXK'][i,a:a+4] if a<K else DVP[i,a-K:a-K+4]
            smem[xs+i*XP+cl:][:4]=W[i,a:a+4] if a<K else U[i,a-K:a-K+4]
        kv=np.full((CH,KVP),np.nan)
        for e in range(CH*pw//8):
            i=e>>(sh-1); cl=8*(e&((1<<(sh-1))-1)); a=c0+cl
            kv[i,cl:cl+8]=(kz[i,a:a+8] if a<K else vz[i,a-K:a-K+8])
        kvs_store[p&1]=kv
    issue(0)
    dacc=np.zeros((8,32,4,4)); part=np.zeros((8,32,2))
    Yp=2*WY_PANEL
    for p in range(np_):
        c0=32*p; pw=width(p); dxs=(p&1)*WY_PANEL; xs=dxs+CH*DXP; kv=kvs_store[p&1]
        if p+1<np_: issue(p+1)
        else:
            kks=((p+1)&1)*WY_PANEL; smem[kks:kks+WY_PANEL]=np.nan
            for e in range(CH*CH//4): smem[kks+(e>>4)*KKP+4*(e&15):][:4]=KK.reshape(-1)[4*e:4*e+4]
        for w in range(8):
            wm,wn=w>>1,w&1
            if 16*wn<pw:
                y=np.zeros((32,2,4))
                for ks in range(8):
                    for nt in range(2):
                        b=[[smem[dxs+(8*ks+t)*DXP+16*wn+gq+8*nt],smem[dxs+(8*ks+t)*DXP+16*wn+gq+8*nt+4*DXP]] for l in range(32) for gq,t in [(l>>2,l&3)]]
                        y[:,nt]=mma(mta[w,:,ks],b,y[:,nt])
                for l in range(32):
                    gq,t=l>>2,l&3
                    for nt in range(2):
                        for hf in range(2):
                            i=16*wm+gq+8*hf; nl=16*wn+8*nt+2*t; n=c0+nl
                            y0,y1=y[l,nt,2*hf],y[l,nt,2*hf+1]
                            smem[Yp+i*YP+nl:][:2]=[y0,y1]
                            r0,r1=kv[i,nl],kv[i,nl+1]
                            if n<K:
                                e0=np.exp(gc[i,n]) if seg[i]==0 else 0; e1=np.exp(gc[i,n+1]) if seg[i]==0 else 0
                                r0,r1=r0*rk[i]*e0,r1*rk[i]*e1
                                out['PDK2'][i,n:n+2]=[e0*beta[i]*y0,e1*beta[i]*y1]
                            elif i<T_rows:
                                out['dv'][i,n-K:n-K+2]=[beta[i]*y0,beta[i]*y1]
                            part[w,l,hf]+=y0*r0+y1*r1
        for w in range(8):
            wm,wn=w>>1,w&1
            for ks in range(4):
                if 8*ks>=pw: break
                a=[[smem[Yp+(16*wm+gq)*YP+t+8*ks],smem[Yp+(16*wm+gq+8)*YP+t+8*ks],smem[Yp+(16*wm+gq)*YP+t+8*ks+4],smem[Yp+(16*wm+gq+8)*YP+t+8*ks+4]] for l in range(32) for gq,t in [(l>>2,l&3)]]
                for nt in range(4):
                    b=[[smem[xs+(32*wn+gq+8*nt)*XP+t+8*ks],smem[xs+(32*wn+gq+8*nt)*XP+t+8*ks+4]] for l in range(32) for gq,t in [(l>>2,l&3)]]
                    dacc[w,:,nt]=mma(a,b,dacc[w,:,nt])
    kks=(np_&1)*WY_PANEL
    for w in range(8):
        wm,wn=w>>1,w&1
        for l in range(32):
            gq,t=l>>2,l&3
            for nt in range(4):
                for hf in range(2):
                    i=16*wm+gq+8*hf; j=32*wn+8*nt+2*t
                    d0=-dacc[w,l,nt,2*hf] if (j<i and seg[i]==seg[j]) else 0
                    d1=-dacc[w,l,nt,2*hf+1] if (j+1<i and seg[i]==seg[j+1]) else 0
                    out['DL'][i,j:j+2]=[d0,d1]
                    part[w,l,hf]+=d0*smem[kks+i*KKP+j]+d1*smem[kks+i*KKP+j+1]
    rowpart=np.full(2*CH,np.nan)
    for w in range(8):
        wm,wn=w>>1,w&1
        for l in range(32):
            gq,t=l>>2,l&3
            if t==0:
                for hf in range(2): rowpart[wn*CH+16*wm+gq+8*hf]=part[w,l&~3,hf]+part[w,(l&~3)+1,hf]+part[w,(l&~3)+2,hf]+part[w,(l&~3)+3,hf]
    out['dbeta']=(rowpart[:CH]+rowpart[CH:])[:T_rows]
    ok=True
    for k in ref:
        err=np.nanmax(np.abs(out[k]-ref[k])) if not np.isnan(out[k]).any() else np.inf
        if not err<1e-9: ok=False; print(K,V,k,'ERR',err, 'nan' if np.isnan(out[k]).any() else '')
    return ok
seg=np.zeros(64,int); seg[40:]=1
cases=[(int(a),int(b)) for a,b in (x.split(',') for x in sys.argv[1:])]
for K,V in cases:
    print(K,V,run(K,V,50,seg,fixed=(K==128 and V==128)))
