// conv1x1_pool.h, conv1x1_grad.h and dilated_conv.h for AVX-512 (x86-64-v4), with the blocking
// of avx512_traits.h.
//
// The library headers, isa.h and simd.h come first, without the target options below: code that
// other files also compile (inline functions, templates) must not carry AVX-512.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "simd.h"

#if BAM_X86
#include <immintrin.h>

BAM_TARGET_BEGIN("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2")

#include "avx512_traits.h"
#include "conv1x1_grad.h"
#include "conv1x1_pool.h"
#include "dilated_conv.h"

namespace bam_fused {

BAM_DEFINE_CONV1X1_POOL(avx512, Avx512)
BAM_DEFINE_CONV1X1_GRAD(avx512, Avx512)
BAM_DEFINE_DILATED_CONV(avx512, Avx512)

}  // namespace bam_fused

BAM_TARGET_END
#endif
