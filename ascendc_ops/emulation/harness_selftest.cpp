// TEST HARNESS self-test: each case breaks one documented AscendC rule; the harness must reject it.
#include <string>

#include "kernel_operator.h"
using namespace AscendC;

namespace {
std::string g_msg;
void body(int which) {
    static half gm[4096];
    GlobalTensor<half> g;
    g.SetGlobalBuffer(gm, 4096);
    TPipe pipe;
    TQue<QuePosition::VECIN, 2> q;
    TBuf<QuePosition::VECCALC> b;
    switch (which) {
        case 0: {  // a correct double-buffered round trip
            pipe.InitBuffer(q, 2, 256);
            LocalTensor<half> a = q.AllocTensor<half>(), c = q.AllocTensor<half>();
            DataCopy(a, g, 128); DataCopy(c, g[128], 128);
            q.EnQue(a); q.EnQue(c);
            a = q.DeQue<half>(); q.FreeTensor(a);
            c = q.DeQue<half>(); q.FreeTensor(c);
            break;
        }
        case 1: { pipe.InitBuffer(b, 256); DataCopy(b.Get<half>(), g, 10); break; }           // 20 B copy
        case 2: { pipe.InitBuffer(b, 200 * 1024); break; }                                     // > 192 KB
        case 3: { pipe.InitBuffer(q, 2, 256); LocalTensor<half> a = q.DeQue<half>(); (void)a; break; }
        case 4: {
            pipe.InitBuffer(q, 2, 256);
            q.AllocTensor<half>(); q.AllocTensor<half>(); q.AllocTensor<half>();  // third buffer
            break;
        }
        case 5: { pipe.InitBuffer(q, 2, 256); LocalTensor<half> a = q.AllocTensor<half>(); q.FreeTensor(a); break; }
        case 6: { pipe.InitBuffer(q, 2, 256); LocalTensor<half> a = q.AllocTensor<half>(); (void)a; break; }  // leak
        case 7: {
            pipe.InitBuffer(b, 1024);
            LocalTensor<float> f = b.Get<float>();
            CompareScalar(f[128].ReinterpretCast<uint8_t>(), f, 0.0f, CMPMODE::GT, 48);  // 192 B: not a repeat
            break;
        }
        case 8: { pipe.InitBuffer(b, 1024); LocalTensor<float> f = b.Get<float>(); Adds(f[3], f, 1.0f, 8); break; }
        case 9: { pipe.InitBuffer(b, 1024); DataCopy(b.Get<half>(), g[4090], 16); break; }    // GM out of bounds
        case 10: {  // GatherMask packs the selected lanes and reports the count
            pipe.InitBuffer(b, 2048);
            LocalTensor<float> s = b.Get<float>();
            LocalTensor<uint8_t> m = s[256].ReinterpretCast<uint8_t>();
            LocalTensor<float> d = s[320];
            for (int i = 0; i < 64; ++i) s.SetValue(i, float(i % 3 == 0 ? i : -i));
            CompareScalar(m, s, 0.0f, CMPMODE::GE, 64);
            uint64_t cnt = 0;
            GatherMask(d, s, m.ReinterpretCast<uint32_t>(), true, 64, GatherMaskParams(1, 1, 8, 8), cnt);
            if (cnt != 22 || d.GetValue(1) != 3.0f || d.GetValue(21) != 63.0f) emu::fail("GatherMask semantics");
            break;
        }
    }
}
}  // namespace

extern "C" int sd_harness_case(int which, int chip) {
    emu::g_chip = chip == 1 ? &emu::CHIP_910B : &emu::CHIP_310B;
    try {
        emu::launch(1, [&] { body(which); });
        g_msg.clear();
        return 0;
    } catch (const std::exception& e) {
        g_msg = e.what();
        return 1;
    }
}
extern "C" const char* sd_harness_message() { return g_msg.c_str(); }
